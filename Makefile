# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,plots]'

venv: $(BIN)/python

# The integration tests use the real Fashion-MNIST when it is installed and skip it otherwise.
test: venv
	-@$(MAKE) -s fashion-mnist 2>/dev/null
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

FASHION := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -e $(FASHION)/train-images-idx3-ubyte.gz || (apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist)

demo: venv fashion-mnist
	$(BIN)/seedslot demo

.PHONY: venv test demo fashion-mnist
