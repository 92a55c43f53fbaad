# One command for the main job, one for the tests; each sets up .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv bench test test-slow clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,real-rewards,cluster]'
	$(VPY) -m pip install -q --no-deps image-reward==1.5 hpsv2x==1.2.0
	touch $(STAMP)

# The default preset's runs side by side, one per core (`--jobs`; records equal a serial run's).
JOBS ?= 2

bench: $(STAMP)
	$(VPY) -m benchmarks.run --jobs $(JOBS)

# The default suite (under 10 minutes on 2 CPU cores); the slow end-to-end tests are
# separate, and CI runs both. One pytest-xdist worker per core; every test process uses
# one torch thread (tests/conftest.py). The default suite sends each test file to one
# worker (loadfile), so that a file's module fixtures (a two-process run, a trained run
# folder) are built once; the slow suite is mostly one file of independent learning runs,
# so its tests go one by one to whichever worker is free (worksteal).
# TEST_WORKERS=0 runs the tests in this process (for pdb).
TEST_WORKERS ?= 2
xdist = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist $(1))

test: $(STAMP)
	$(VPY) -m pytest -q -m 'not slow' $(call xdist,loadfile)

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow $(call xdist,worksteal)

clean:
	rm -rf $(VENV)
