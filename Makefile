# zddd — see README.md. Every target runs as root on Debian 12.
PY      := /usr/bin/python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VPY) -m pytest

# What `make demo` uses (nftables backend): zddd's runtime, the venv, and the lab's HAProxy,
# nginx and dbus-daemon. Installed on the machine itself: run it on a machine you can spare.
DEMO_DEBS := nftables python3-nftables python3-pyroute2 python3-dbus-fast python3-sdnotify \
        python3-prometheus-client python3-venv python3-pip python3-setuptools iproute2 dbus \
        procps curl haproxy nginx-light
# The eBPF backends (`make demo BACKEND=tc|xdp|sk_lookup`, the tests): bcc pulls LLVM/clang;
# packaging/bpf-headers.sh adds kernel headers.
BPF_DEBS := python3-bpfcc bpftool
# What the whole suite needs on top: pytest, wrk, and an sshd and Ansible for the rolling-deploy
# tests.
TEST_DEBS := $(DEMO_DEBS) $(BPF_DEBS) python3-pytest python3-hypothesis python3-pytest-xdist \
        systemd wrk ansible-core openssh-server bash-completion
# The canary e2e test's Prometheus (2.42, run as a plain binary with the test's config), without
# its recommended node exporter: the test needs none, and the package would start it.
PROM_DEBS := prometheus

.PHONY: setup setup-demo setup-bpf test test-fast test-integration test-e2e test-system lint \
        demo bench soak deb clean

# apt-get only when a package is missing (after one apt-get update); $(2): apt-get's options.
define install_missing
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(2) $$missing; \
	fi
endef

# Idempotent, each step only when needed: `setup-demo` the demo's packages and the venv,
# `setup-bpf` bcc and kernel headers, `setup` everything the tests need.
setup: $(VENV)/.setup-done
setup-demo: $(VENV)/.setup-demo-done
setup-bpf: $(VENV)/.setup-bpf-done

$(VENV)/.setup-demo-done: pyproject.toml Makefile
	$(call install_missing,$(DEMO_DEBS))
	test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@# zdddlab (the test/demo/bench lab) is not packaged: a .pth naming this checkout makes it
	@# importable from the venv, in namespaces too. Rewritten each time, so it follows a move.
	$(VPY) -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "zdddlab.pth").write_text("$(CURDIR)\n")'
	touch $@

$(VENV)/.setup-bpf-done: $(VENV)/.setup-demo-done
	$(call install_missing,$(BPF_DEBS))
	sh packaging/bpf-headers.sh
	touch $@

$(VENV)/.setup-done: $(VENV)/.setup-demo-done $(VENV)/.setup-bpf-done
	$(call install_missing,$(TEST_DEBS))
	$(call install_missing,$(PROM_DEBS),--no-install-recommends)
	touch $@

# The whole suite. pytest's exit code 5 ("no tests ran") fails like any other. Unit and
# integration tests each build their own namespaces, buses and bpffs, and mostly wait on the
# kernel and the network, so they run on 3 workers (the behaviour suite runs once per backend);
# e2e and system tests share clusters and containers per module and run in one process.
JOBS ?= 3
test: setup
	$(PYTEST) -n $(JOBS) tests/unit tests/integration
	$(PYTEST) tests/e2e tests/system

test-fast: setup
	$(PYTEST) -m unit tests

test-integration: setup
	$(PYTEST) -n $(JOBS) -m integration tests

test-e2e: setup
	$(PYTEST) -m e2e tests

# The .debs in a booted Debian 12 container (tests/system). Builds dist/*.deb when older than
# its sources, installs mmdebstrap and systemd-container if missing, and caches the base tree in
# /var/cache/zddd-test (ZDDD_TEST_CACHE): about 1.5 min cold, 45 s warm.
test-system: setup
	$(PYTEST) -m system tests/system

# ruff, mypy and ansible-lint are development tools, not runtime dependencies: they come from PyPI
# into the venv. ansible-lint 6.x is the last that works with Debian 12's ansible-core 2.14;
# the pins keep pip from pulling a newer ansible-core (and ansible-compat, which wants one) into
# the venv over Debian's. Its config: examples/ansible/.ansible-lint.
ANSIBLE_LINT := ansible-lint==6.22.2 ansible-compat>=4.1.11,<5 ansible-core>=2.14,<2.15
lint: setup
	test -x $(VENV)/bin/ruff || $(VPY) -m pip install -q 'ruff==0.17.6'
	$(VENV)/bin/ruff check zddd zdddlab tests bench examples
	test -x $(VENV)/bin/mypy || $(VPY) -m pip install -q 'mypy==1.13.0'
	$(VENV)/bin/mypy --python-executable $(PY)
	test -x $(VENV)/bin/ansible-lint || $(VPY) -m pip install -q $(foreach p,$(ANSIBLE_LINT),'$(p)')
	cd examples/ansible && $(CURDIR)/$(VENV)/bin/ansible-lint

# BACKEND=tc|xdp|sk_lookup runs the demo on that data plane (it then installs bcc and kernel
# headers too: setup-bpf).
# SERVICES=2: two services (web and api) per host, api rolled while web keeps its traffic.
BACKEND ?= nftables
SERVICES ?= 1
demo: setup-demo $(if $(filter-out nftables,$(BACKEND)),setup-bpf)
	$(VPY) examples/demo.py --backend $(BACKEND) --services $(SERVICES)

# Three tables: the backends side by side (bench/backends.py), 1 against 64 services per
# backend (bench/services.py), and weights (bench/weights.py). All run even if one misses a
# goal; the worse exit status wins.
bench: setup
	@status=0; for b in backends services weights; do \
	  $(VPY) bench/$$b.py || { s=$$?; [ $$s -gt $$status ] && status=$$s; }; done; exit $$status

# Endurance, not in CI: load through HAProxy, a switch a second and a drain cycle a minute for
# SOAK_MINUTES (default 30); prints failed requests, zddd's RSS and descriptors, switch p50/p99.
soak: setup
	$(VPY) bench/soak.py

# dist/zddd_<version>_all.deb and dist/zddctl_<version>_all.deb (the client alone, which zddd
# depends on) for Debian 12 with dpkg-buildpackage; installs its own build
# dependencies and fails on lintian errors (packaging/build-deb.sh).
deb:
	sh packaging/build-deb.sh

clean:
	rm -rf $(VENV) dist build *.egg-info
