# Two entry points (see README): `make demo` and `make test`. Each creates its own venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 -q

demo: setup
	$(PY) -m rep_medsam_jax.demo --out demo_output

clean-venv:
	rm -rf $(VENV)
