# rkllm-fleet top-level tasks. Everything runs from a fresh clone: `make test` builds what it needs.
# Targets that touch the simulated fleet (demo, test, sim-*) need root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv double test bench lint demo clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements/dev.txt requirements/compat-clients.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	# Clients whose pins conflict with dev.txt, for tests/component/test_client_compat.py.
	python3 -m venv $(VENV)/clients
	$(VENV)/clients/bin/pip install -q --disable-pip-version-check -r requirements/compat-clients.txt
	touch $@

double:
	$(MAKE) -s -C tests/fakelib

lint: venv
	$(VENV)/bin/ruff check rkllm_runtime tests bench

# The arm64 board image (about 5 minutes to build on a fresh machine) builds in the background while
# the first tests run on amd64 fleets; tests/e2e/test_fleet_arm64.py waits for it on the cache's lock.
# Two pytest-xdist workers, one module (or group of modules sharing a fleet) at a time each: see
# tests/conftest.py. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: venv double
	@mkdir -p build
	@python3 -m tests.fleet.rootfs arm64-board >build/arm64-image.log 2>&1 & image=$$!; \
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --durations=15; status=$$?; \
	wait $$image || { echo "background arm64 image build failed:"; tail -n 20 build/arm64-image.log; }; \
	exit $$status

# Provision the simulated fleet with site.yml and stream one chat answer through nginx.
demo: venv double
	$(PY) -m tests.fleet.demo --arch $(ARCH) --boards $(BOARDS)

bench: venv double
	$(PY) -m bench.bench_binding 2>/dev/null
	$(PY) -m bench.bench_server
	$(PY) -m bench.bench_body_stall
	$(PY) -m bench.bench_embeddings
	$(PY) -m bench.bench_balancer
	$(PY) -m bench.bench_conversations

clean:
	rm -rf build $(VENV)

include tests/fleet/fleet.mk
