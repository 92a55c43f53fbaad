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

# The default suite (under 10 minutes on 2 CPU cores); the slow end-to-end learning
# runs are separate, and CI runs both.
test: $(STAMP)
	$(VPY) -m pytest -q -m 'not slow'

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

clean:
	rm -rf $(VENV)
