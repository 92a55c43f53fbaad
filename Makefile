# One command for the main job, one for the tests; each sets up .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv bench test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,real-rewards]'
	$(VPY) -m pip install -q --no-deps image-reward==1.5 hpsv2x==1.2.0
	touch $(STAMP)

bench: $(STAMP)
	$(VPY) -m benchmarks.run

test: $(STAMP)
	$(VPY) -m pytest -q

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV)
