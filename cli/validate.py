"""Check params.yaml before `dvc repro` starts: schema, paths, and BN layers for BN-based sources."""

from stages._common import read_params, roots


def main() -> None:
    params = read_params()
    from dfq.pipeline.checks import check_model
    from dfq.pipeline.schema import ParamsError

    try:
        check_model(params, roots())
    except ParamsError as exc:
        raise SystemExit(str(exc)) from None
    print("params.yaml: valid")


if __name__ == "__main__":
    main()
