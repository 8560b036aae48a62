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

# The integration tests use the real Fashion-MNIST when it is installed and skip it otherwise:
# `make test` goes on without it (one line says why those tests skip), `make demo` stops.
test: venv
	@$(MAKE) -s fashion-mnist FASHION_OPTIONAL=1
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist, installed with apt-get
# (through sudo when not root). FASHION_OPTIONAL=1: a failed install is reported, not an error.
FASHION := /usr/share/datasets/fashion-mnist
FASHION_PKG := dataset-fashion-mnist
APT_GET ?= apt-get
fashion-mnist:
	@test -e $(FASHION)/train-images-idx3-ubyte.gz && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif [ -t 0 ]; then sudo="sudo "; else sudo="sudo -n "; fi; \
	echo "installing Fashion-MNIST: $${sudo}$(APT_GET) install -y $(FASHION_PKG) (Debian package, into $(FASHION))"; \
	log=$$(mktemp); \
	if $${sudo}$(APT_GET) install -y -q $(FASHION_PKG) >$$log 2>&1; then \
		why="installed, but $(FASHION)/train-images-idx3-ubyte.gz is missing"; \
		test -e $(FASHION)/train-images-idx3-ubyte.gz && { rm -f $$log; exit 0; }; \
	else \
		why=$$(grep -E '^(E: |sudo: )' $$log | tail -n 1); [ -n "$$why" ] || why=$$(grep . $$log | tail -n 1); \
	fi; \
	rm -f $$log; \
	if [ -n "$(FASHION_OPTIONAL)" ]; then \
		echo "could not install $(FASHION_PKG) ($$why): the tests that need the real Fashion-MNIST will skip"; \
	else \
		echo "could not install $(FASHION_PKG) ($$why); install it, or run \`seedslot demo --data-dir DIR\`" >&2; exit 1; \
	fi

demo: venv fashion-mnist
	$(BIN)/seedslot demo

.PHONY: venv test demo fashion-mnist
