# `make test` installs every dependency (apt + pip + test tiers) and runs the whole suite.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: test deps test-fast bench demo golden readme-options

test: deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

deps:
	scripts/install-deps.sh

# Unit, golden and static checks only (no containers, no real vLLM).
test-fast:
	$(PYTHON) -m pytest tests/unit tests/static $(PYTEST_ARGS)

golden:
	UPDATE_GOLDEN=1 $(PYTHON) -m pytest tests/unit/test_golden.py

# The README's options table, generated from the option table in vfgen/options.py.
readme-options:
	$(PYTHON) -m vfgen.options --write-readme README.md

bench:
	$(PYTHON) -m bench

demo:
	vfgen demo
