"""zddd refuses an invalid config at start: exit 78 (EX_CONFIG), the key named on stderr, and
nothing touched (no table in the kernel, no state file, no bus name)."""

import pytest
from zdddlab import VENV_BIN, Bus, NetNS, Proc


class Bare:
    """One namespace and a bus: all a zddd that must refuse to start needs."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.app = NetNS("cfg")
        self.bus = None
        try:
            self.bus = Bus(tmp)
        except BaseException:
            self.app.close()
            raise

    def close(self):
        self.bus.close()
        self.app.close()


@pytest.fixture
def bare(need_root, tmp_path):
    b = Bare(tmp_path)
    try:
        yield b
    finally:
        b.close()

CASES = {
    "unknown-key": ("frobnicate = 1\n", "frobnicate"),
    "unknown-nested-key": ("[targets.main]\nprot = 8080\n", "targets.main.prot"),
    "unknown-target": ("[targets.canary]\nport = 8081\n", "targets.canary"),
    "unknown-section-key": ("[health]\ninterval = 1\nretries = 3\n", "health.retries"),
    "wrong-type-port": ('listen_port = "8888"\n', "listen_port"),
    "bool-as-port": ("listen_port = true\n", "listen_port"),
    "wrong-type-timeout": ('drain_timeout = "30s"\n', "drain_timeout"),
    "wrong-type-table": ("targets = 5\n", "targets"),
    "port-too-big": ("[targets.backup]\nport = 70000\n", "targets.backup.port"),
    "port-zero": ("listen_port = 0\n", "listen_port"),
    "negative-timeout": ("drain_timeout = -1\n", "drain_timeout"),
    "two-targets-one-port": ("[targets.main]\nport = 80\n", "targets.backup.port"),
    "target-on-listen-port": ("[targets.backup]\nport = 8888\n", "targets.backup.port"),
    "listen-on-target-port": ("listen_port = 8080\n", "targets.main.port"),
    "agent-on-target-port": ('[agent]\nlisten = "[::]:80"\n', "agent.listen"),
    "metrics-bad-endpoint": ('[metrics]\nlisten = "localhost:9488"\n', "metrics.listen"),
    "bad-initial": ('initial = "Main"\n', "initial"),
    "bad-backend": ('backend = "iptables"\n', "backend"),
    "bad-health": ('[targets.main]\nhealth = "http:health"\n', "targets.main.health"),
    "relative-state-file": ('state_file = "state.json"\n', "state_file"),
    "not-toml": ("listen_port = \n", "TOML"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every case at once, each zddd in a namespace of its own (they start in parallel: the
    suite stays fast). Case id -> (exit code, stderr, ruleset after, state file exists)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables)")
    tmp = tmp_path_factory.mktemp("refusals")
    bus = Bus(tmp)
    spaces, runs = [], {}
    try:
        for case, (text, _) in CASES.items():
            ns = NetNS("cfg")
            spaces.append(ns)
            state = tmp / f"{case}.state.json"
            config = tmp / f"{case}.toml"
            # The test's own state file first, so a config accepted by mistake stays in tmp.
            config.write_text(text if "state_file" in text else f'state_file = "{state}"\n' + text)
            proc = Proc(ns.cmd(str(VENV_BIN / "zddd"), "--config", str(config),
                               "--bus", bus.address),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            runs[case] = (ns, proc, state)
        results = {}
        for case, (ns, proc, state) in runs.items():
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            ruleset = ns.run("nft", "list", "ruleset").stdout.strip()
            results[case] = (proc.returncode, err, ruleset, state.exists())
        yield results
    finally:
        for _, proc, _ in runs.values():
            proc.close()
        for ns in spaces:
            ns.close()
        bus.close()


@pytest.mark.parametrize("case", CASES.keys())
def test_invalid_config_exits_78_naming_the_key(refusals, case):
    key = CASES[case][1]
    rc, stderr, ruleset, state_exists = refusals[case]
    assert rc == 78, (rc, stderr)
    assert key in stderr, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert ruleset == "", "the kernel was touched"
    assert not state_exists


def test_missing_config_file_given_explicitly_is_a_config_error(bare):
    lab = bare
    missing = lab.tmp / "nope.toml"
    r = lab.app.run(str(VENV_BIN / "zddd"), "--config", str(missing), "--bus", lab.bus.address,
                    check=False, timeout=15)
    assert r.returncode == 78, r
    assert str(missing) in r.stderr
    assert lab.app.run("nft", "list ruleset").stdout.strip() == ""


def test_a_valid_config_with_other_ports_runs(lab):
    """The counterpart: the same machinery accepts a good config, so the refusals above are
    about the keys, not about the harness."""
    from zdddlab import Vhost, http_get, APP_V4

    other = Vhost(lab.app, 8081, "main8081")
    lab.closers.append(other.stop)
    z = lab.start_zddd({"listen_port": 9999, "targets": {"main": {"port": 8081,
                                                                  "health": "http:/"}},
                        "agent": {"listen": "127.0.0.1:8890"}})
    assert http_get(lab.client, APP_V4, 9999) == "main8081"
    assert z.prop("ListenPort") == 9999
    assert z.prop("Targets") == {"main": 8081, "backup": 80}


# ---- zddd --check-config: the same validation, nothing touched --------------------------------

def check_config(ns, config, *extra: str):
    """`zddd --check-config --config CONFIG` in `ns`, as nobody (no capability, no write access
    anywhere the config names), from a world-readable copy of the package."""
    import os
    import pwd

    from zdddlab import PYTHON, public_package

    os.chmod(config.parent, 0o755)
    if config.exists():
        os.chmod(config, 0o644)
    pw = pwd.getpwnam("nobody")
    return ns.run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                  PYTHON, "-m", "zddd.daemon", "--check-config", "--config", str(config), *extra,
                  check=False, timeout=30, cwd="/",
                  env={**os.environ, "PYTHONPATH": str(public_package())})


@pytest.fixture
def public_tmp(need_root):
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="zddd-check-", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_check_config_refuses_every_invalid_case_naming_the_key(bare, public_tmp):
    for case, (text, key) in CASES.items():
        config = public_tmp / f"{case}.toml"
        config.write_text(text)
        r = check_config(bare.app, config)
        assert r.returncode == 78, (case, r)
        assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, (case, r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr, (case, r)
    assert bare.app.run("nft", "list", "ruleset").stdout.strip() == ""


def test_check_config_accepts_a_valid_file_and_touches_nothing(bare, public_tmp):
    """Valid although nothing it names could be used by this process: a start as nobody would
    fail (no CAP_NET_ADMIN, no state directory, the agent port taken), the check does not try."""
    from zdddlab import name_has_owner

    state = public_tmp / "missing-dir" / "state.json"
    pins = public_tmp / "pins"
    config = public_tmp / "zddd.toml"
    config.write_text(f'state_file = "{state}"\nbpf_pin_dir = "{pins}"\nbackend = "tc"\n'
                      '[agent]\nlisten = "127.0.0.1:8889"\n'
                      '[targets.main]\nhealth = "http:/health"\n')
    holder = bare.app.popen("python3", "-c", "import socket,time; s=socket.socket(); "
                            "s.bind(('127.0.0.1', 8889)); s.listen(); time.sleep(60)")
    try:
        r = check_config(bare.app, config, "--bus", bare.bus.address)
    finally:
        holder.kill()
        holder.wait()
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout == f"zddd: {config}: valid config\n"
    assert bare.app.run("nft", "list", "ruleset").stdout.strip() == ""
    assert not state.parent.exists() and not pins.exists()
    assert not name_has_owner(bare.bus.address)


def test_check_config_reads_a_missing_explicit_file_as_invalid(bare, public_tmp):
    r = check_config(bare.app, public_tmp / "nope.toml")
    assert r.returncode == 78 and str(public_tmp / "nope.toml") in r.stderr, r


def test_zddd_help_mentions_check_config():
    import subprocess

    from zdddlab import VENV_BIN

    out = subprocess.run([str(VENV_BIN / "zddd"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--check-config" in out and "78" in out
