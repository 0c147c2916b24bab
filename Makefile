# Two commands do all the set-up:  `make repro` (run the pipeline) and `make test` (run the tests).
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data-package repro test ui exp ablation

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
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
	python -m stages.validate
	dvc repro

test: setup
	$(VENV)/bin/python -m pytest -q tests

ui:
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1

# Run the pipeline under a params profile as a DVC experiment (profiles/*.yaml), e.g.
#   make exp PROFILE=cifar10-resnet20      make ablation
exp: setup
	python -m stages.profile $(PROFILE)

ablation: setup
	python -m stages.profile ablation
