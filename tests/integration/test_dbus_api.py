"""The D-Bus API and zddctl: bad input refused with its named error and nothing changed, the
policy (anyone reads, only root switches), reloads, exit codes, signals."""

import asyncio
import json
import re
import signal

import pytest
from zdddlab import APP_V4, Vhost, http_get, scrape_metrics, wait_for, without_counters

from zddd.service.dbus import Message, MessageBus, MessageType, Variant

E = "org.zddd.Steering1.Error."
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
DAY_USEC = 24 * 3600 * 1_000_000


def snapshot(z) -> tuple:
    """Everything a refused call must leave as it was."""
    return (without_counters(z.nft()), z.prop("ActiveTarget"), z.prop("Draining"),
            z.prop("Targets"), z.prop("LastSwitchUSec"))


BAD_CALLS = [
    # (method, signature, body, error)
    ("Switch", "s", ["Main"], E + "InvalidTarget"),
    ("Switch", "s", [" main"], E + "InvalidTarget"),
    ("Switch", "s", ["main "], E + "InvalidTarget"),
    ("Switch", "s", [""], E + "InvalidTarget"),
    ("Switch", "s", ["OFF"], E + "InvalidTarget"),
    ("SwitchWithOptions", "sa{sv}", ["Backup", {}], E + "InvalidTarget"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"forse": Variant("b", True)}],
     E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"force": Variant("s", "true")}],
     E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"force": Variant("u", 1)}], E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"drain_timeout_usec": Variant("u", 0)}],
     E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"drain_timeout_usec": Variant("x", 0)}],
     E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"drain_timeout_usec": Variant("t", DAY_USEC + 1)}],
     E + "InvalidArgument"),
    ("SwitchWithOptions", "sa{sv}", ["off", {"force": Variant("b", True),
                                             "bogus": Variant("b", True)}],
     E + "InvalidArgument"),
    ("WaitDrained", "st", ["Main", 0], E + "InvalidTarget"),
    ("WaitDrained", "st", ["off", 0], E + "InvalidTarget"),
    ("WaitDrained", "st", ["main", DAY_USEC + 1], E + "InvalidArgument"),
    # Wrong signatures are refused before zddd looks at the arguments.
    ("Switch", "", [], INVALID_ARGS),
    ("Switch", "i", [1], INVALID_ARGS),
    ("Switch", "ss", ["off", "now"], INVALID_ARGS),
    ("SwitchWithOptions", "s", ["off"], INVALID_ARGS),
    ("SwitchWithOptions", "sa{ss}", ["off", {"force": "true"}], INVALID_ARGS),
    ("WaitDrained", "su", ["main", 0], INVALID_ARGS),
    ("WaitDrained", "s", ["main"], INVALID_ARGS),
    ("Reload", "s", ["now"], INVALID_ARGS),
]


def test_bad_input_is_refused_with_its_error_and_changes_nothing(lab):
    z = lab.start_zddd()
    before = snapshot(z)
    failures = []
    for member, sig, body, want in BAD_CALLS:
        err, reply = z.call(member, sig, *body)
        if err != want:
            failures.append(f"{member}({sig}) {body!r}: {err} {reply!r}, wanted {want}")
        elif not reply or not isinstance(reply[0], str) or not reply[0]:
            failures.append(f"{member}({sig}) {body!r}: {err} without a message")
        if snapshot(z) != before:
            failures.append(f"{member}({sig}) {body!r} changed the state")
    assert not failures, "\n".join(failures)
    assert http_get(lab.client, APP_V4, 8888) == "main"
    metrics = scrape_metrics(lab.app)
    invalid_targets = sum(1 for m, _, b, w in BAD_CALLS
                          if w == E + "InvalidTarget" and m.startswith("Switch"))
    assert metrics['zddd_switches_total{result="refused",service="default",target="invalid"}'] \
        == invalid_targets
    assert metrics['zddd_switches_total{result="ok",service="default",target="off"}'] == 0
    assert "Traceback" not in z.log() and "internal_error" not in z.log()


def test_unhealthy_target_is_refused_unless_forced(lab):
    z = lab.start_zddd()
    lab.backup.stop()
    wait_for(lambda: not z.prop("TargetsUp")["backup"], 3, "backup to be probed down")
    before = snapshot(z)
    assert z.call("Switch", "s", "backup")[0] == E + "TargetUnhealthy"
    r = z.zddctl("switch", "backup")
    assert r.returncode == 1 and "TargetUnhealthy" in r.stderr
    assert snapshot(z) == before
    assert z.call("SwitchWithOptions", "sa{sv}", "backup",
                  {"force": Variant("b", True)})[0] is None
    assert z.steered_to() == "backup"


def test_switch_to_the_active_target_changes_nothing(lab):
    z = lab.start_zddd()
    before = snapshot(z)
    assert z.call("Switch", "s", "main") == (None, [])
    assert snapshot(z) == before


# ---- Reload ------------------------------------------------------------------------------

def reload_keeps_running(lab, z, text: str, key: str) -> None:
    before = snapshot(z)
    ports = z.prop("ListenPort"), z.prop("DrainTimeoutUSec"), z.prop("TargetsUp")
    z.write_config(text)
    err, body = z.call("Reload")
    assert err == E + "InvalidConfig", (err, body)
    assert key in body[0], body
    r = z.zddctl("reload")
    assert r.returncode == 1 and "InvalidConfig" in r.stderr and key in r.stderr, r
    assert "Traceback" not in r.stderr
    assert snapshot(z) == before
    assert (z.prop("ListenPort"), z.prop("DrainTimeoutUSec"), z.prop("TargetsUp")) == ports
    assert http_get(lab.client, APP_V4, 8888) == z.prop("ActiveTarget")
    assert "zddd_active_target" in "".join(scrape_metrics(lab.app))


@pytest.mark.parametrize("text,key", [
    ("listen_port = 8888\n[targets.backup\nport = 81\n", "TOML"),
    ('drain_timeout = 3\n[targets.backup]\nport = 8081\nhealth = "tcp"\nwat = 1\n',
     "targets.backup.wat"),
    ("drain_timeout = 3\n[targets.main]\nport = 80\n", "targets.main.port"),
    ('drain_timeout = "3"\n', "drain_timeout"),
], ids=["not-toml", "unknown-key", "port-clash", "wrong-type"])
def test_reload_with_a_broken_config_keeps_the_old_one(lab, text, key):
    z = lab.start_zddd()
    reload_keeps_running(lab, z, text, key)


@pytest.mark.parametrize("change", [{"listen_port": 9999}, {"backend": "tc"},
                                    {"bpf_pin_dir": "/sys/fs/bpf/zddd-other"}],
                         ids=["listen_port", "backend", "bpf_pin_dir"])
def test_reload_changing_a_restart_key_is_refused(lab, change):
    from zdddlab import to_toml

    z = lab.start_zddd()
    assert z.zddctl("switch", "backup").returncode == 0
    (key,) = change
    reload_keeps_running(lab, z, to_toml(dict(z.config, **change)), key)
    assert lab.app.run("nft", "list table inet zddd").stdout.count("8888") >= 2


def test_reload_changing_a_target_port_moves_the_redirect(lab):
    z = lab.start_zddd()
    other = Vhost(lab.app, 8081, "backup8081")
    lab.closers.append(other.stop)
    assert z.zddctl("switch", "backup").returncode == 0
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    z.config["targets"] = {"backup": {"port": 8081}}
    z.write_config()
    r = z.zddctl("reload")
    assert r.returncode == 0, r.stderr
    assert z.prop("Targets") == {"main": 8080, "backup": 8081}
    assert z.prop("ActiveTarget") == "backup"
    assert http_get(lab.client, APP_V4, 8888) == "backup8081"
    assert http_get(lab.app, "::1", 8888) == "backup8081"
    # The kernel's table redirects to the new port (nftables: the backup_port map's element).
    assert re.search(r": 8081\b", lab.app.run("nft", "list", "table", "inet", "zddd").stdout)
    # And switching back and forth uses the new port.
    assert z.zddctl("switch", "main").returncode == 0
    assert z.zddctl("switch", "backup").returncode == 0
    assert http_get(lab.client, APP_V4, 8888) == "backup8081"
    st = json.loads(z.zddctl("status", "--json").stdout)
    assert st["targets"]["backup"]["port"] == 8081


def test_sighup_reloads_too(lab):
    z = lab.start_zddd()
    z.config["drain_timeout"] = 7
    z.write_config()
    z.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: z.prop("DrainTimeoutUSec") == 7_000_000, 3, "SIGHUP reload")
    assert z.proc.poll() is None
    # A broken config on SIGHUP is logged and the running one stays.
    z.write_config("drain_timeout = 5\nlisten_port = 70000\n")
    z.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "listen_port" in z.log().split("event=reload")[-1], 3, "the refusal logged")
    assert z.proc.poll() is None
    assert z.prop("DrainTimeoutUSec") == 7_000_000
    assert http_get(lab.client, APP_V4, 8888) == "main"


# ---- zddctl ------------------------------------------------------------------------------

def test_zddctl_exit_codes(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "backup")
    assert (r.returncode, r.stderr) == (0, "")
    r = z.zddctl("switch", "Main")
    assert r.returncode == 1
    assert "InvalidTarget" in r.stderr and "Main" in r.stderr and "Traceback" not in r.stderr
    assert z.steered_to() == "backup"
    for argv in (["switch"], ["frob"], [], ["status", "--bogus"], ["wait-drained"],
                 ["wait-drained", "main", "--timeout", "x"]):
        r = z.zddctl(*argv)
        assert r.returncode == 2, (argv, r)
        assert "usage" in r.stderr and "Traceback" not in r.stderr
    r = z.zddctl("status")
    assert r.returncode == 0 and "active target: backup" in r.stdout
    st = json.loads(z.zddctl("status", "--json").stdout)
    # SPEC "Services": one service's status has today's keys plus `services`.
    assert set(st) == {"active_target", "draining", "backend", "listen_port",
                       "last_switch_usec", "last_switch_timestamp_usec", "last_switch_caller",
                       "targets", "services"}
    assert st["services"]["default"]["active_target"] == "backup"
    assert st["active_target"] == "backup" and st["backend"] == "nftables"
    assert st["listen_port"] == 8888 and st["last_switch_usec"] > 0
    assert st["targets"]["main"]["port"] == 8080 and st["targets"]["backup"]["up"] is True
    r = z.zddctl("wait-drained", "main", "--timeout", "1")
    assert r.returncode == 0, r.stderr


def test_zddctl_without_zddd(lab):
    z = lab.start_zddd()
    z.kill(signal.SIGTERM)
    for argv in (["status"], ["switch", "main"], ["reload"]):
        r = z.zddctl(*argv, timeout=10)
        assert r.returncode == 1, (argv, r)
        assert "not running" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess_zddctl("--bus", f"unix:path={lab.tmp}/no-such-bus", "status")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("zddctl:")


def subprocess_zddctl(*argv: str):
    import subprocess

    from zdddlab import VENV_BIN
    return subprocess.run([str(VENV_BIN / "zddctl"), *argv], capture_output=True, text=True,
                          timeout=10)


def test_unprivileged_user_reads_but_cannot_switch(public_lab):
    lab = public_lab
    z = lab.start_zddd()
    r = z.zddctl("status", "--json", user="nobody")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["active_target"] == "main"
    before = snapshot(z)
    for argv in (["switch", "backup"], ["switch", "off", "--force"], ["reload"],
                 ["wait-drained", "main", "--timeout", "0"]):
        r = z.zddctl(*argv, user="nobody")
        assert r.returncode == 1, (argv, r)
        assert "permission denied" in r.stderr.lower() and "Traceback" not in r.stderr
    assert snapshot(z) == before
    assert http_get(lab.client, APP_V4, 8888) == "main"
    # Root is allowed through the same policy.
    assert z.zddctl("switch", "backup").returncode == 0


# ---- signals -----------------------------------------------------------------------------

async def _watch(address: str, actions) -> list[Message]:
    """Subscribe to zddd's signals, run `actions` (blocking callables) in a thread, and return
    the signals seen until 0.3 s after the last action."""
    bus = await MessageBus(bus_address=address).connect()
    seen: list[Message] = []
    try:
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=["type='signal',sender='org.zddd.Steering1',path='/org/zddd/Steering1'"]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        bus.add_message_handler(
            lambda m: seen.append(m) if m.message_type == MessageType.SIGNAL else None)
        for action in actions:
            await asyncio.get_running_loop().run_in_executor(None, action)
        await asyncio.sleep(0.3)
    finally:
        bus.disconnect()
    return seen


def test_switch_emits_properties_changed_and_switched(lab):
    z = lab.start_zddd()

    def run(*argv):
        def go():
            r = z.zddctl(*argv)
            assert r.returncode == 0, r.stderr
        return go

    seen = asyncio.run(_watch(lab.bus.address, [
        run("switch", "backup"), run("switch", "backup"), run("switch", "off", "--force"),
        run("switch", "main")]))
    switched = [tuple(m.body) for m in seen if m.member == "Switched"]
    assert [s[:2] for s in switched] == [("main", "backup"), ("backup", "off"), ("off", "main")]
    assert all(m.interface == "org.zddd.Steering1.Manager" and m.signature == "sst"
               for m in seen if m.member == "Switched")
    assert all(0 < s[2] < 1_000_000 for s in switched), switched
    assert switched[-1][2] == z.prop("LastSwitchUSec")
    changes = [m.body for m in seen if m.member == "PropertiesChanged"]
    assert all(m.interface == "org.freedesktop.DBus.Properties"
               for m in seen if m.member == "PropertiesChanged")
    active = [c[1]["ActiveTarget"].value for c in changes
              if c[0] == "org.zddd.Steering1.Manager" and "ActiveTarget" in c[1]]
    assert active == ["backup", "off", "main"]
    last_switch = [c[1]["LastSwitchUSec"].value for c in changes if "LastSwitchUSec" in c[1]]
    assert len(last_switch) == 3 and last_switch == [s[2] for s in switched]


def test_unprivileged_user_may_introspect_but_not_own_the_name(public_lab):
    import subprocess

    lab = public_lab
    z = lab.start_zddd()
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*nobody, "busctl", f"--address={lab.bus.address}", "introspect",
                        "org.zddd.Steering1", "/org/zddd/Steering1"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    for name in ("Switch", "SwitchWithOptions", "WaitDrained", "Reload", "ActiveTarget",
                 "Switched"):
        assert name in r.stdout
    script = ("import asyncio, sys\n"
              "from dbus_fast.aio import MessageBus\n"
              "async def main():\n"
              "    bus = await MessageBus(bus_address=sys.argv[1]).connect()\n"
              "    try:\n"
              "        print(await bus.request_name('org.zddd.Steering1'))\n"
              "    except Exception as e:\n"
              "        print(type(e).__name__, getattr(e, 'type', ''))\n"
              "asyncio.run(main())\n")
    # Debian's python (dbus-fast is a Debian package), not the venv's: nobody may not be able
    # to reach the checkout (a clone in /root is 0700).
    from zdddlab import PYTHON
    r = subprocess.run([*nobody, PYTHON, "-c", script, lab.bus.address], cwd="/",
                       capture_output=True, text=True, timeout=10)
    assert "AccessDenied" in r.stdout, (r.stdout, r.stderr)
    assert z.prop("ActiveTarget") == "main"


def test_a_state_file_that_cannot_be_written_refuses_the_switch(lab):
    z = lab.start_zddd()
    before = snapshot(z)
    z.state_path.unlink()
    z.state_path.mkdir()  # os.replace onto a directory fails, even for root
    try:
        err, body = z.call("Switch", "s", "backup")
        assert err == E + "BackendFailure", (err, body)
        assert "state" in body[0]
        assert snapshot(z) == before
        assert http_get(lab.client, APP_V4, 8888) == "main"
    finally:
        z.state_path.rmdir()
    assert z.call("Switch", "s", "backup")[0] is None
    assert json.loads(z.state_path.read_text())["target"] == "backup"


def test_reload_moves_the_metrics_and_agent_listeners(lab):
    from zdddlab import agent_ask, connect_error

    z = lab.start_zddd()
    assert agent_ask(lab.client, APP_V4) == "ready up"
    z.config["metrics"] = {"listen": "127.0.0.1:9499"}
    z.config["agent"] = {"listen": "0.0.0.0:8899"}
    z.write_config()
    assert z.zddctl("reload").returncode == 0
    wait_for(lambda: connect_error(lab.app, "127.0.0.1", 9499)[0] == "ok", 3,
             "metrics on the new port")
    assert 'zddd_active_target{service="default",target="main"}' in scrape_metrics(
        lab.app, "127.0.0.1:9499")
    assert connect_error(lab.app, "127.0.0.1", 9488)[0] == "ECONNREFUSED"
    wait_for(lambda: connect_error(lab.client, APP_V4, 8899)[0] == "ok", 3, "agent moved")
    assert agent_ask(lab.client, APP_V4, 8899) == "ready up"
    assert connect_error(lab.client, APP_V4, 8889)[0] == "ECONNREFUSED"


def test_calls_outside_the_interface_are_refused_and_change_nothing(lab):
    z = lab.start_zddd()
    before = snapshot(z)

    async def go():
        bus = await MessageBus(bus_address=lab.bus.address).connect()
        replies = []
        try:
            for msg in (
                # No interface: refused rather than guessed (a classic way around policies).
                Message(destination="org.zddd.Steering1", path="/org/zddd/Steering1",
                        member="Switch", signature="s", body=["backup"]),
                Message(destination="org.zddd.Steering1", path="/org/zddd/Other",
                        interface="org.zddd.Steering1.Manager", member="Switch",
                        signature="s", body=["backup"]),
                Message(destination="org.zddd.Steering1", path="/org/zddd/Steering1",
                        interface="org.zddd.Steering1.Manager", member="Frob",
                        signature="s", body=["backup"]),
                Message(destination="org.zddd.Steering1", path="/org/zddd/Steering1",
                        interface="org.freedesktop.DBus.Properties", member="Set",
                        signature="ssv", body=["org.zddd.Steering1.Manager", "ActiveTarget",
                                               Variant("s", "backup")]),
            ):
                reply = await bus.call(msg)
                replies.append((reply.message_type, reply.error_name))
        finally:
            bus.disconnect()
        return replies

    replies = asyncio.run(go())
    assert all(t == MessageType.ERROR for t, _ in replies), replies
    assert replies[3][1] == "org.freedesktop.DBus.Error.PropertyReadOnly"
    assert snapshot(z) == before


def test_once_the_name_is_owned_zddd_is_working(lab):
    """Name and READY come after the data plane is programmed and every target was probed:
    the first call a client can make already finds both."""
    # backup's first probe takes 0.5 s: a name requested before it ended would refuse backup.
    z = lab.start_zddd({"targets": {"backup": {"health": "http:/slow?s=0.5"}},
                        "health": {"interval": 5, "timeout": 2}})  # returns once it owns the name
    assert z.steered_to() == "main"
    assert z.prop("TargetsUp") == {"main": True, "backup": True}
    assert z.call("Switch", "s", "backup") == (None, [])  # backup was probed up already
    assert http_get(lab.client, APP_V4, 8888) == "backup"


def test_concurrent_switches_leave_kernel_property_and_state_file_in_agreement(lab):
    z = lab.start_zddd()

    async def storm():
        buses = [await MessageBus(bus_address=lab.bus.address).connect() for _ in range(4)]
        try:
            calls = [bus.call(Message(
                destination="org.zddd.Steering1", path="/org/zddd/Steering1",
                interface="org.zddd.Steering1.Manager", member="Switch", signature="s",
                body=[("main", "backup", "Main")[i % 3]]))
                for i in range(60) for bus in [buses[i % 4]]]
            return await asyncio.gather(*calls)
        finally:
            for bus in buses:
                bus.disconnect()

    replies = asyncio.run(storm())
    errors = [r.error_name for r in replies if r.message_type == MessageType.ERROR]
    assert errors == [E + "InvalidTarget"] * 20
    active = z.prop("ActiveTarget")
    assert active in ("main", "backup")
    assert z.steered_to() == active
    assert json.loads(z.state_path.read_text())["target"] == active
    assert http_get(lab.client, APP_V4, 8888) == active
    m = scrape_metrics(lab.app)
    assert m['zddd_switches_total{result="ok",service="default",target="main"}'] == 20
    assert m['zddd_switches_total{result="ok",service="default",target="backup"}'] == 20


# ---- when and by whom ---------------------------------------------------------------------

def test_last_switch_timestamp_and_caller(lab):
    import os
    import subprocess
    import time

    from zdddlab import VENV_BIN

    z = lab.start_zddd()
    assert z.prop("LastSwitchTimestamp") == 0 and z.prop("LastSwitchCaller") == ""  # never
    before = int(time.time() * 1e6)
    assert z.zddctl("switch", "backup").returncode == 0
    after = int(time.time() * 1e6)
    assert before <= z.prop("LastSwitchTimestamp") <= after
    assert z.prop("LastSwitchCaller") == "uid=0"
    line = [ln for ln in z.log().splitlines() if "event=switch " in ln][-1]
    assert line.endswith('caller="uid=0"'), line  # logfmt: a value with "=" is quoted
    # As `zddctl -H` runs it on the remote host: in an ssh login (here without logind, the
    # process' environment names the client).
    env = dict(os.environ, SSH_CONNECTION="198.51.100.7 51234 192.0.2.1 22", USER="deploy")
    r = subprocess.run([str(VENV_BIN / "zddctl"), "--bus", z.bus.address, "switch", "main"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert z.prop("LastSwitchCaller") == "uid=0 ssh=deploy@198.51.100.7"
    stamp = z.prop("LastSwitchTimestamp")
    # Kept across a restart: the state file has it.
    z.kill()
    z.start()
    assert z.prop("LastSwitchTimestamp") == stamp
    assert z.prop("LastSwitchCaller") == "uid=0 ssh=deploy@198.51.100.7"
    m = scrape_metrics(lab.app)
    assert m['zddd_last_switch_timestamp_seconds{service="default"}'] == pytest.approx(
        stamp / 1e6, abs=1e-6)


# ---- the adapter on a real bus, over a stand-in core ------------------------------------------

class _AdapterCore:
    """What the D-Bus adapter calls, failing where a test needs it to."""

    def __init__(self):
        from zddd.core import Snapshot

        self.observers = []
        self.snap = Snapshot("main", "", "nftables", 8888, {"main": 8080, "backup": 80},
                             {"main": True, "backup": True})

    def snapshot(self):
        return self.snap

    def connection_counts(self):
        raise OSError("sock_diag: Operation not permitted")

    def switch(self, target, **kwargs):
        from zddd.errors import InvalidArgument

        class LaterRefusal(InvalidArgument):
            pass

        raise LaterRefusal(f"no switching to {target} today")


@pytest.fixture
def adapter(need_root, tmp_path):
    """zddd's D-Bus adapter serving a stand-in core on a private bus; yields the bus address."""
    import threading
    import time

    from zdddlab import Bus

    from zddd.service import dbus

    bus = Bus(tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def reload():
        pass

    try:
        for attempt in range(100):  # the socket file appears just before the daemon listens
            try:
                served = asyncio.run_coroutine_threadsafe(
                    dbus.serve(_AdapterCore(), bus.address, reload), loop).result(10)
                break
            except ConnectionRefusedError:
                if attempt == 99:
                    raise
                time.sleep(0.05)
        yield bus.address
        loop.call_soon_threadsafe(served.disconnect)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        bus.close()


def test_a_failed_connection_count_leaves_getall_working(adapter):
    from zdddlab import dbus_call

    err, body = dbus_call(adapter, "GetAll", "s", [INTERFACE_NAME], 10,
                          interface="org.freedesktop.DBus.Properties")
    assert err is None, body
    props = {k: v.value for k, v in body[0].items()}
    assert props["ActiveTarget"] == "main"
    assert props["Connections"] == {}  # unknown: no target has a count
    err, body = dbus_call(adapter, "Get", "ss", [INTERFACE_NAME, "Connections"], 10,
                          interface="org.freedesktop.DBus.Properties")
    assert err is None and body[0].value == {}


def test_a_new_error_subclass_still_answers_with_its_condition(adapter):
    from zdddlab import dbus_call

    err, body = dbus_call(adapter, "Switch", "s", ["backup"], 10)
    assert err == E + "InvalidArgument"
    assert body == ["no switching to backup today"]


INTERFACE_NAME = "org.zddd.Steering1.Manager"


def test_getall_works_while_connections_cannot_be_counted(lab):
    """A real zddd whose sock_diag socket cannot be opened (no descriptor left): GetAll, and so
    `zddctl status`, still answers; Connections is empty (unknown), not a failed call."""
    import subprocess
    from pathlib import Path

    from zdddlab import dbus_call

    z = lab.start_zddd({"health": {"interval": 5, "timeout": 0.5}})
    assert z.prop("Connections") == {"main": 0, "backup": 0}
    pid = z.proc.pid
    open_fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={open_fds}:"], check=True)
    try:
        err, body = dbus_call(z.bus.address, "GetAll", "s", [INTERFACE_NAME], 10,
                              interface="org.freedesktop.DBus.Properties")
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=4096:"], check=True)
    assert err is None, body
    props = {k: v.value for k, v in body[0].items()}
    assert props["ActiveTarget"] == "main" and props["Connections"] == {}
    assert "event=count_failed" in z.log()
    assert z.prop("Connections") == {"main": 0, "backup": 0}  # counted again once it can
