# make demo  - set up if needed, then the whole path on the embedded default (synthetic world, demo model)
# make test  - set up if needed, then the test suite (CPU, tiny configs)
# make bench - the benchmark report of the demo export
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed
# export's data: image + prompt + answer files (the runtime's requests format) written from the synthetic world
CALIB := --calib-data runs/demo/calib/requests.jsonl
EVAL := --eval-data runs/demo/eval/requests.jsonl

.PHONY: setup demo test bench lint format clean

setup: $(STAMP)

# torch first, pinned by the constraints file: with it in place no later package can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# The whole path on the embedded default. Each step is a command a user runs too (README); the training step skips
# stages whose done.json exists, so a second `make demo` goes straight to export.
demo: $(STAMP)
	$(PY) -m training --preset demo --out runs/demo
	$(PY) -m training.data.synthetic --seed 0 --split train --n 64 --out runs/demo/calib --formats requests --force
	$(PY) -m training.data.synthetic --seed 0 --split test --n 64 --out runs/demo/eval --formats requests --force
	$(PY) -m export.onnx --model runs/demo/final --out exports/demo-fp32 --precision fp32 $(EVAL) --force
	$(PY) -m export.onnx --model runs/demo/final --out exports/demo-int4 --precision int4 --quant gptq $(CALIB) $(EVAL) --force
	$(PY) -m export.quality --model runs/demo/final --out reports/demo-quality --variants fp32,int4-rtn,int4-gptq \
		$(CALIB) $(EVAL) --force
	$(PY) -m training.data.synthetic --seed 0 --split val --n 7 --out runs/demo/requests --formats requests --force
	$(PY) -m runtime --model exports/demo-int4 --batch runs/demo/requests/requests.jsonl \
		--out runs/demo/requests/answers.jsonl --max-new-tokens 48
	$(PY) -m benchmarks --model exports/demo-int4 --out reports/demo --prompt-tokens 128,256,384

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks --model exports/demo-int4 --out reports/demo --prompt-tokens 128,256,384

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs exports
