"""Run the pipeline under a params profile as a DVC experiment: `python -m cli.profile NAME [--queue]`.

A profile (profiles/NAME.yaml) maps dotted params keys to values; they become `dvc exp run -S key=value`
arguments, so params.yaml's defaults stay as they are in git and `dvc exp show` lists the result.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        names = ", ".join(sorted(p.stem for p in Path("profiles").glob("*.yaml")))
        raise SystemExit(f"usage: python -m cli.profile NAME [--queue] [extra dvc exp run args]; profiles: {names}")
    path = Path("profiles") / f"{argv[0]}.yaml"
    if not path.is_file():
        raise SystemExit(f"{path}: no such profile")
    overrides = yaml.safe_load(path.read_text()) or {}
    cmd = ["dvc", "exp", "run", "-n", argv[0]]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={json.dumps(value)}"]
    cmd += argv[1:]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
