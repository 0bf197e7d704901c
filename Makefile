# vftrace: `make lab` (the main job, in the lab VM) and `make test` (every test) do all
# the set-up they need first; it is idempotent and takes seconds when nothing is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
PFS    ?= 2
KERNEL ?=
MODE   ?= mmap
VMS    ?= 2

.PHONY: all setup lab shell test unit bench kmod clean help
all: help

help:
	@echo "make lab    the lab VM: pf_sched, KVM guests on its VFs, the live dashboard (KERNEL=6.1, MODE=trap)"
	@echo "make shell  the lab VM with pf_sched switching, in a shell"
	@echo "make test   run every test: unit tests here, lab tests in a VM per kernel"
	@echo "make unit   only the unit tests (no VM, no root)"
	@echo "make bench  the benchmarks (lab + host), printed and written to BENCHMARKS.md (ARGS=--full)"
	@echo "make setup  install what is missing (Debian packages, kernels, .venv, pf_sched)"
	@echo "make kmod   build pf_sched for every installed kernel (build/kmod/<release>/)"

setup:
	@sh scripts/setup.sh

kmod:
	@sh scripts/build-kmod.sh

# The main job: pf_sched switching, KVM guests on its VFs, and the live dashboard; q quits
# the dashboard and shuts the VM down.  MODE=trap for trapped BARs.
lab: setup
	$(VENV)/bin/vftrace lab --mode $(MODE) --pfs $(PFS) --vms $(VMS) $(if $(KERNEL),--kernel $(KERNEL))

shell: setup
	$(VENV)/bin/vftrace lab --pf-sched --pfs $(PFS) $(if $(KERNEL),--kernel $(KERNEL))

test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
