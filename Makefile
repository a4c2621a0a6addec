# Two commands set everything up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench bench-fleet fleet clean

install: $(STAMP)

# The editable install (hatchling) is one .pth line naming the checkout: it joins
# sys.path, so Twisted's plugin scan finds twisted/plugins/agent_plugin.py and
# code edits need no reinstall. A setuptools-era install left agent.egg-info in
# the checkout, which that sys.path entry would show as a second "agent": gone.
$(STAMP): pyproject.toml
	rm -rf build *.egg-info
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# PYTHONMALLOC=malloc: the agent can give a burst's memory back (agent/memory.py).
run: install
	PYTHONMALLOC=malloc $(BIN)/twistd -n agent --http tcp:8080:interface=127.0.0.1

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench

# A fleet demo: a private PostgreSQL under ./fleet-data, N agents (3), a kill -9; Ctrl-C stops it.
fleet: install
	$(BIN)/python examples/fleet_demo.py

# The fleet: 5 agents on a private PostgreSQL (needs its binaries, as the tests do).
bench-fleet: install
	$(BIN)/python -m bench.fleet

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache fleet-data
