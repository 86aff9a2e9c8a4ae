# Single verbs; the logic lives in scripts/ and the package.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/tandem-vllm demo run

clean:
	rm -rf $(VENV) build *.egg-info
