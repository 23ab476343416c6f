# smtp-ingress: `make run` serves mail on the embedded default (unless $SMTP_INGRESS_CONFIG or
# /etc/smtp-ingress/ingress.toml names a file: ingress/tools/cli.py); `make test` sets up and tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint docs bytecode unit integration fuzz bench bench-quick bench-cluster bench-proxy sysdeps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# Debian packages the tests and benchmarks use (real Postfix, smtp-source, swaks, HAProxy,
# systemd-analyze, promtool for the alert rules, redis-server for [cluster] redis).
# Installed only when running as root and missing; otherwise the tests that need them skip.
# The tests run private instances: the install leaves no system service enabled or running
# (.ci/sysdeps: a deny-all policy-rc.d during apt-get, then what it installed is disabled).
sysdeps:
	@.ci/sysdeps

run: $(STAMP)
	$(VENV)/bin/smtp-ingress run

lint: $(STAMP)
	$(VENV)/bin/ruff check ingress workers tests bench
	$(VENV)/bin/mypy --strict ingress/core ingress/policy
	$(VENV)/bin/mypy ingress workers
	$(VENV)/bin/lint-imports --no-cache

# docs/configuration.md, generated from the config schema (ingress/core/schema.py: each key's
# default, bounds and doc); tests/unit/test_config_reference.py fails when it is stale.
docs: $(STAMP)
	$(PY) -m ingress.tools.configdoc docs/configuration.md

# Our modules compiled once. Where PYTHONDONTWRITEBYTECODE is set (it is on these machines) no
# process writes bytecode, and each of the 9 processes of every instance a test starts compiled
# ingress/ and workers/ from source again: 0.6 s of CPU an instance, a quarter of its start-up.
# (Python reads the files whatever that variable says; a stale one is simply not used.)
bytecode: $(STAMP)
	$(PY) -m compileall -q ingress workers tests bench

# TEST_WORKERS tests at a time, by file (a module's fixtures stay in one process), then the
# tests marked serial alone (@pytest.mark.serial, tests/conftest.py: failover, deadlines, shared
# rates). 3 on the 2 cores: the tests wait (sleeps, deadlines, disk) more than they compute; at
# 2 the parallel phase kept the cores 62 % busy (422 s); at 3, 327 s, measured the same hour.
TEST_WORKERS ?= 3
test: $(STAMP) sysdeps lint bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" tests
	$(PY) -m pytest -q -m serial tests

unit: $(STAMP) bytecode
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) sysdeps bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" tests/integration
	$(PY) -m pytest -q -m serial tests/integration

# The SMTP dialogue fuzzer, long run: random (not the fixed examples of `make test`), with
# shrinking and the example database in .hypothesis/. FUZZ_EXAMPLES sets the count per mode;
# FUZZ_ARGS is passed to pytest (e.g. FUZZ_ARGS='-k clean': an expected failure still shrinks).
FUZZ_EXAMPLES ?= 3000
FUZZ_ARGS ?=
fuzz: $(STAMP)
	SMTP_FUZZ=1 SMTP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
	  --timeout=0 -rxX $(FUZZ_ARGS) tests/integration/test_fuzz_smtp.py

bench: $(STAMP) sysdeps
	$(PY) -m bench.run --full

bench-quick: $(STAMP) sysdeps
	$(PY) -m bench.run --quick

# Two edges + one lanes node (tcp + CURVE) beside a single host, same run (bench/cluster.py)
bench-cluster: $(STAMP) sysdeps
	$(PY) -m bench.cluster --runs 3

# Issue 20: the flood through HAProxy (etc/examples/haproxy.cfg, PROXY v2), with and without
# the fast-port route, against the same HAProxy without a flood (bench/proxy.py)
bench-proxy: $(STAMP) sysdeps
	$(PY) -m bench.proxy --runs 3 --variants recommended,one-backend,nbthread1

clean:
	rm -rf $(VENV) var build *.egg-info
