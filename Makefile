# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned, so pip takes the CPU wheel and nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install install-test demo test lint clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.created

install: venv
	$(PIP) install -q -e ".[eval]"

install-test: venv
	$(PIP) install -q -e ".[test]"

demo: install
	$(VENV)/bin/llm360 run --run-dir runs/demo

test: install-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
