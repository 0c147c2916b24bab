# Two commands do all the set-up:  `make repro` (run the pipeline) and `make test` (run the tests).
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data-package repro lint test ui exp ablation recon dsg-study sweep

# The pinned requirements, then dfq itself as an editable install (pyproject.toml; its dependencies are the
# requirements just installed).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q -e . --no-deps
	touch $@

# Debian's dataset-fashion-mnist when apt is available; otherwise the data stage explains the options.
data-package:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; see README (data.root / data.download)"; \
	else echo "note: apt is not available; see README (data.root / data.download)"; fi

setup: $(VENV)/.installed data-package

repro: setup
	python -m cli.validate
	dvc repro

# Lint and format check (ruff, configured in pyproject.toml), then the tests.
LINT_PATHS := dfq stages cli bench tests
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# The suite on TEST_WORKERS pytest-xdist workers, a test file per worker at a time: the end-to-end file (first,
# tests/conftest.py) on one, the rest beside it. TEST_WORKERS=0: one process. The 15 slowest tests are listed.
TEST_WORKERS ?= 2
test: setup lint
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# After `dvc pull` (or `dvc exp apply` of a pulled experiment): a teammate's MLflow runs rebuilt from the pulled
# metrics and dvc.lock, without rerunning any stage; idempotent (runs already logged with the same inputs are skipped).
track: setup
	python -m stages.track

# Opens on the runs table of track.experiment (MLflow 3's UI would open its GenAI overview).
ui:
	@python -c "from dfq.pipeline.tracking import runs_page_url; import yaml; \
	e = yaml.safe_load(open('params.yaml'))['track']['experiment']; \
	print('MLflow UI: open', runs_page_url('sqlite:///$(abspath mlflow.db)', e))"
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1

# Run the pipeline under a params profile as a DVC experiment (profiles/*.yaml), e.g.
#   make exp PROFILE=cifar10-resnet20      make ablation
exp: setup
	python -m cli.profile $(PROFILE)

ablation: setup
	python -m cli.profile ablation

# Reconstruction study (CIFAR-10 ResNet-20, W4A4 and W3A3, zeroq/dsg_code/real data, seeds 0 and 1): one
# queued experiment per rounding, run one at a time; the first generates the synthetic data, the others
# restore it from DVC's run-cache. Follow with `dvc queue status`, then `dvc exp show --md`.
ROUNDINGS ?= nearest qdrop adaround brecq
recon: setup
	mlflow db upgrade sqlite:///$(abspath mlflow.db)
	for r in $(ROUNDINGS); do python -m cli.profile cifar10-resnet20-recon --queue -n recon-$$r \
	  -S quantize.rounding=$$r || exit 1; done
	DFQ_THREADS=1 dvc queue start -j 1

# DSG study (issue: DSG that beats ZeroQ, with error bars), one queued DVC experiment each, run one at a
# time (generation is restored from the run-cache after the first): shared CIFAR-10 ResNet-20, 3 seeds,
# 64 images per set; gaussian/zeroq/real/dsg/dsg_code at W4A4 under min-max and the DSG code's range
# rule; the walk from the paper's recipe to the code's; W6A6; percentile and MSE ranges; the code's own
# 40-image budget; then the default model. DFQ_THREADS=1 keeps a shared 2-core machine from thrashing.
# Then: python -m cli.compare --metric top1 --filter "tags.bits = 'w4a4'"
W4 := -S 'quantize.bits=["w4a4"]'
DEFAULT_STUDY := -S 'export.cells=[]' -S quantize.weight_scheme=asymmetric -S quantize.bias=float -S 'generate.seeds=[0,1,2]' -S 'generate.sources=["gaussian","zeroq","real","dsg","dsg_code"]' \
  -S 'quantize.bits=["w6a6","w4a4"]'
dsg-study: setup
	mlflow db upgrade sqlite:///$(abspath mlflow.db)
	python -m cli.profile cifar10-resnet20 --queue -n main-minmax $(W4)
	python -m cli.profile cifar10-resnet20 --queue -n main-dsgrange $(W4) -S quantize.act_method=dsg
	python -m cli.profile cifar10-resnet20-dsg-walk --queue -n walk-minmax
	python -m cli.profile cifar10-resnet20-dsg-walk --queue -n walk-dsgrange -S quantize.act_method=dsg
	python -m cli.profile cifar10-resnet20 --queue -n w6-minmax -S 'quantize.bits=["w6a6"]'
	python -m cli.profile cifar10-resnet20 --queue -n w6-dsgrange -S 'quantize.bits=["w6a6"]' -S quantize.act_method=dsg
	python -m cli.profile cifar10-resnet20 --queue -n main-percentile $(W4) -S quantize.act_method=percentile
	python -m cli.profile cifar10-resnet20 --queue -n main-mse $(W4) -S quantize.act_method=mse
	python -m cli.profile cifar10-resnet20 --queue -n peer40-minmax $(W4) -S data.num_images=40 \
	  -S generate.batch_size=40 -S 'generate.sources=["dsg_code","zeroq"]'
	dvc exp run --queue -n default-minmax $(DEFAULT_STUDY)
	dvc exp run --queue -n default-dsgrange $(DEFAULT_STUDY) -S quantize.act_method=dsg
	DFQ_THREADS=1 dvc queue start -j 1

# A parameter sweep as queued DVC experiments, two at a time; every run lands in the same MLflow DB
# (created first: several workers creating a fresh SQLite DB at once would race).
SWEEP ?= -S 'generate.dsg.eps=0.5,0.8,0.9' -S 'quantize.bits=[w4a4],[w6a6]' -S 'export.cells=[]'
sweep: setup
	mlflow db upgrade sqlite:///$(abspath mlflow.db)
	dvc exp run --queue $(SWEEP)
	dvc queue start -j 2
	@echo "follow with: dvc queue status; then: dvc exp show"
