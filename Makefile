# jobd developer entry points. `make run` and `make test` work on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV_SOCKET := $(CURDIR)/.jobd/jobd.sock

.PHONY: run test lint typecheck unit system-deps bench deb clean

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

# Debian packages the suite drives for real: php-cli/php-xml (evQueue-style PHP client, example page), phpunit
# (contrib/php-client), chromium + chromium-driver (example page in a headless browser), mandoc (man page lint),
# debhelper/dh-python/lintian (building and checking the .deb), systemd (units in a throw-away systemd), strace,
# locales (the sources localedef compiles a non-UTF-8 locale from, tests/test_locales.py), and the Depends of the
# .deb (tests/test_debian_package.py installs it without network).
# Installed with apt-get only when one is missing, so a warm machine pays one dpkg-query.
DEB_PACKAGES := php-cli php-xml phpunit chromium chromium-driver mandoc man-db systemd strace curl locales \
	debhelper dh-python pybuild-plugin-pyproject lintian dpkg-dev fakeroot bash-completion \
	python3-peewee python3-aiohttp python3-lxml python3-sdnotify python3-dateutil tzdata

system-deps:
	@missing=; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing with apt-get:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# The suite spends about half its time waiting on real daemons, children and timers, so two processes run it in
# about 60 % of the time one takes. Whole files go to one worker (loadfile): a module's accounts on the machine, its
# package build or its throw-away systemd are made once. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

unit: $(STAMP) system-deps
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

test: lint typecheck unit

bench: $(STAMP) system-deps
	$(PY) bench/run.py

# The Debian package, from the working tree's tracked and new (not ignored) files, built in a copy under build/deb
# (debian/README.Debian): debian/vendor/fetch first gets the pinned sdists it bundles (PyPI once, then
# ~/.cache/jobd/vendor), so dpkg-buildpackage itself needs no network. PATH is the system's own, so pybuild builds
# with Debian's python3 and not a pyenv or venv one.
DEB_BUILD := build/deb
deb: $(STAMP) system-deps
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/jobd
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(DEB_BUILD)/jobd
	PIP="$(CURDIR)/$(PY) -m pip" $(DEB_BUILD)/jobd/debian/vendor/fetch
	cd $(DEB_BUILD)/jobd && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --display-info --fail-on error,warning $(DEB_BUILD)/jobd_*.deb
	@echo "built: $$(ls $(DEB_BUILD)/jobd_*.deb)"

clean:
	rm -rf $(VENV) .jobd .mypy_cache .ruff_cache .pytest_cache build
