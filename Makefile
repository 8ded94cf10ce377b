# jobd developer entry points. `make run` and `make test` work on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV_SOCKET := $(CURDIR)/.jobd/jobd.sock

.PHONY: run test lint typecheck unit php bench clean

# Debian's system Python needs python3-venv for `python3 -m venv`; install it only when missing.
$(PY):
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv with apt-get"; apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: $(STAMP)
	@mkdir -p .jobd
	@echo "jobd runs in the foreground with examples/dev/ (socket and state under ./.jobd/); Ctrl-C stops it."
	@echo "In another shell:  export JOBD_SOCKET=$(DEV_SOCKET); $(CURDIR)/$(VENV)/bin/jobctl status"
	exec $(VENV)/bin/jobd --config-dir examples/dev

lint: $(STAMP)
	$(VENV)/bin/ruff check jobd tests bench
	$(VENV)/bin/ruff format --check jobd tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict jobd

# tests/test_php_client.py runs an evQueue-style PHP client: php-cli with DOM (php-xml), installed only when missing.
php:
	@php -r 'exit(class_exists("DOMDocument") ? 0 : 1);' 2>/dev/null || { \
	  echo "installing php-cli and php-xml with apt-get"; apt-get update -qq && apt-get install -y -qq php-cli php-xml; }

unit: $(STAMP) php
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	@command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace; }
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .jobd .mypy_cache .ruff_cache .pytest_cache
