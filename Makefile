# Two commands matter: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=
# Each build's run is spread over TEST_WORKERS pytest-xdist workers, a test file each at a time;
# the tests marked pg_heavy run one at a time on PostgreSQL across all of them (tests/conftest.py),
# so that four processes stay within a stock PostgreSQL's 100 connections.  0: one process a build.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: venv build demo test test-compiled test-pure test-slow bench-micro bench-peers bench-e2e clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Build the C extensions in place (the editable install imports them from stem/_speedups).
build: venv
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m stem.cli demo

# The compiled build and the pure twin run at once (most of a test's time is spent waiting on
# worker processes and servers), each with a Redis db of its own for what runs in stem's
# default namespace; each log is printed when its run ends, and either failing fails the target.
# The tests whose outcome does not depend on the selected build (marked build_independent: they
# load both builds side by side, or read the source) would test the same thing in either run:
# the pure run leaves them to the compiled one (a PYTEST_ARGS -m comes later and wins).
test: build
	@rm -f .test-compiled.log .test-pure.log; \
	STEM_EXPECT_COMPILED=1 STEM_TEST_REDIS_OWN_DB=9 $(PY) -m pytest -p no:cacheprovider $(XDIST) $(PYTEST_ARGS) \
		> .test-compiled.log 2>&1 & compiled=$$!; \
	STEM_PURE=1 STEM_TEST_REDIS_OWN_DB=8 $(PY) -m pytest -p no:cacheprovider -m "not slow and not build_independent" \
		$(XDIST) $(PYTEST_ARGS) > .test-pure.log 2>&1 & pure=$$!; \
	wait $$compiled; c=$$?; echo "== compiled build (exit $$c)"; cat .test-compiled.log; \
	wait $$pure; p=$$?; echo "== pure-Python twins, STEM_PURE=1 (exit $$p)"; cat .test-pure.log; \
	test $$c -eq 0 -a $$p -eq 0
	$(PY) -m pytest benchmarks/test_harness_smoke.py -p no:cacheprovider -q

test-compiled: build
	STEM_EXPECT_COMPILED=1 $(PY) -m pytest $(PYTEST_ARGS)

test-pure: venv
	STEM_PURE=1 $(PY) -m pytest $(PYTEST_ARGS)

# The stress runs left out of `make test` (each has a bounded twin there): a million
# parked Postgres rows, a Redis kill and restart in the middle of 5,000 tasks, a chord of
# 1,000 members; and cross-products whose guarantees default cases check (README, "Two commands").
test-slow:
	$(MAKE) test PYTEST_ARGS="-m slow $(PYTEST_ARGS)"

bench-micro: build
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-group-by=group -q

# The peer queues (celery, dramatiq, rq, arq, huey) come from the bench extra.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[bench]'
	touch $@

BENCH_PEERS_ARGS ?= --tasks 10000 --repeat 3
bench-peers: build $(VENV)/.bench-installed
	$(PY) benchmarks/peers/run.py $(BENCH_PEERS_ARGS)

BENCH_E2E_ARGS ?= --broker redis --tasks 20000
bench-e2e: build $(VENV)/.bench-installed
	$(PY) benchmarks/e2e.py $(BENCH_E2E_ARGS)

clean:
	rm -rf build $(VENV) stem/_speedups/*.so _speedups/*.c *.egg-info
