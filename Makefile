# The two commands a newcomer runs are `make run` and `make test`; each sets
# itself up first (apt packages pyfuse3 builds against, a venv, the project).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pyfuse3 is built from its source release plus patches/pyfuse3 (lock
# requests and fallocate); rebuilt only when those files change.
PYFUSE3_STAMP := $(VENV)/.pyfuse3-built
PYFUSE3_FILES := $(wildcard patches/pyfuse3/*)
APT_PKGS := fuse3 libfuse3-dev pkg-config patch gcc python3-dev etcd-server
RUN_DIR ?= $(CURDIR)/.run
MNT ?= $(CURDIR)/mnt
PORT ?= 7000

.PHONY: setup test lint run stop bench clean

setup: $(STAMP)

# Re-run only when the dependency list or the pyfuse3 patches change; apt is
# consulted only for packages that are missing, so a ready machine spends no
# time here.  The patched pyfuse3 goes in before the project, so its
# `pyfuse3>=` requirement is already met by it.
$(STAMP): pyproject.toml $(PYFUSE3_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

$(PYFUSE3_STAMP): $(PYFUSE3_FILES)
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing apt packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade 'pip>=25.3'
	patches/pyfuse3/build.sh $(VENV)
	@touch $(PYFUSE3_STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

run: setup
	@$(BIN)/python scripts/run_local.py start --run-dir $(RUN_DIR) --mount $(MNT) --port $(PORT)

stop: setup
	@$(BIN)/python scripts/run_local.py stop --run-dir $(RUN_DIR) --mount $(MNT)

bench: setup
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean: stop
	rm -rf $(VENV) $(RUN_DIR)
