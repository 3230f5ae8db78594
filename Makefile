# zddd — see README.md. Every target runs as root on Debian 12.
PY      := /usr/bin/python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VPY) -m pytest

DEBS := nftables python3-nftables python3-pyroute2 python3-dbus-fast python3-sdnotify \
        python3-prometheus-client python3-pytest python3-venv python3-pip python3-setuptools iproute2 dbus systemd curl \
        haproxy nginx-light wrk python3-bpfcc python3-hypothesis python3-pytest-xdist procps bpftool \
        ansible-core openssh-server bash-completion

.PHONY: setup test test-fast test-integration test-e2e test-system lint demo bench soak deb clean

setup: $(VENV)/.setup-done

# Idempotent: apt-get only when a package is missing, the venv only when absent.
$(VENV)/.setup-done: pyproject.toml Makefile
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	sh packaging/bpf-headers.sh
	test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@# zdddlab (the test/demo/bench lab) is not packaged: a .pth naming this checkout makes it
	@# importable from the venv, in namespaces too. Rewritten each time, so it follows a move.
	$(VPY) -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "zdddlab.pth").write_text("$(CURDIR)\n")'
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

# ruff is a development tool, not a runtime dependency: it comes from PyPI into the venv.
lint: setup
	test -x $(VENV)/bin/ruff || $(VPY) -m pip install -q ruff
	$(VENV)/bin/ruff check zddd zdddlab tests bench examples

# BACKEND=tc|xdp|sk_lookup runs the demo on that data plane (bcc, kernel headers: `make setup`).
BACKEND ?= nftables
demo: setup
	$(VPY) examples/demo.py --backend $(BACKEND)

bench: setup
	$(VPY) bench/backends.py

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
