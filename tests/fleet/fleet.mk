# Fleet simulator targets; the top-level Makefile includes this file (`include tests/fleet/fleet.mk`).
# Run as root. ARCH=arm64|amd64, BOARDS=N, BALANCERS=N (2: a virtual address); SIM_ARGS passes more, e.g.
#   make sim-up ARCH=amd64 BOARDS=2 SIM_ARGS="--board-driver b2=0.9.6 --board-ram b2=8192"
ARCH ?= arm64
BOARDS ?= 3
BALANCERS ?= 2
SIM_ARGS ?=
SIM := python3 -m tests.fleet.sim

.PHONY: sim-images sim-up sim-down sim-status

sim-images:
	$(SIM) build --arch $(ARCH)

sim-up: double
	$(SIM) up --arch $(ARCH) --boards $(BOARDS) --balancers $(BALANCERS) $(SIM_ARGS)

sim-down:
	$(SIM) down

sim-status:
	$(SIM) status
