# Single verbs; the logic lives in scripts/ and the package.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install protos lint test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

# gRPC stubs from protos/ into tandem_vllm/serve/pb/ (also regenerated on import when stale)
protos: install
	$(PY) -m tandem_vllm.serve.protos

# ruff (lint) and mypy (types) over the package, as part of every test run
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install protos lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install protos
	$(VENV)/bin/tandem-vllm serve

clean:
	rm -rf $(VENV) build *.egg-info
