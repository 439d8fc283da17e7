# ugro — set-up, the demo and the tests. Every target that runs something starts with `setup`,
# so `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is a CPU build on local disk on these machines; an unpinned torch would
# download a multi-gigabyte CUDA build.
TORCH_SPEC ?= torch==2.13.0
SETUP_STAMP := $(VENV)/.installed

# Debian packages the tests and the demo use, and the command each one provides.
# sshd and ip make the launcher tests' network-namespace nodes; docker-compose validates
# docker-compose.yml offline (no Docker engine needed); slurm-wlm and munge run the Slurm
# backend's tests, victoria-metrics receives remote_write in the tests of a distributed store.
APT_PACKAGES := prometheus:promtool prometheus-alertmanager:amtool \
  prometheus-node-exporter:prometheus-node-exporter openssh-server:sshd iproute2:ip tmux:tmux \
  docker-compose:docker-compose slurm-wlm:slurmctld slurm-wlm:slurmd munge:munged \
  victoria-metrics:victoria-metrics

# `make demo DEMO_ARGS=--keep` leaves Prometheus and Alertmanager running afterwards.
DEMO_ARGS ?=
DEMO_STEPS ?= 600

.PHONY: setup system-packages demo test lint bench clean

setup: system-packages $(SETUP_STAMP)

system-packages:
	@missing=""; \
	for entry in $(APT_PACKAGES); do \
	  command -v "$${entry#*:}" >/dev/null || [ -x "/usr/sbin/$${entry#*:}" ] \
	    || missing="$$missing $${entry%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(SETUP_STAMP): pyproject.toml
	@echo "==> creating $(VENV) with ugro installed in editable mode"
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)' -e '.[train,test,dev,dashboards,plots,hf,lightning]'
	@touch $@

demo: setup
	$(BIN)/ugro demo --steps $(DEMO_STEPS) $(DEMO_ARGS)

test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/integration_overhead.py
	$(BIN)/python benchmarks/exporter_scrape.py
	$(BIN)/python benchmarks/endpoint_security.py
	$(BIN)/python benchmarks/alert_latency.py
	$(BIN)/python benchmarks/launch_scaling.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
