"""The data plane outlives zddd: a kill changes nothing, a restart adopts what the kernel has
(kernel wins over the state file), and without a table zddd restores the saved or initial
target."""

import json
import signal
import time

import pytest
from zdddlab import APP_V4, APP_V6, KeepAlive, NftMonitor, connect_error, http_get, wait_for

pytestmark = pytest.mark.backends


def nft_monitor(lab, z):
    """nft's own event stream of zddd's table: for nftables, every change shows, even one undone
    at once; BPF backends are compared by data_plane() alone."""
    if z.backend != "nftables":
        return None
    monitor = NftMonitor(lab.app)
    lab.closers.append(monitor.close)
    return monitor


def switch(z, target: str) -> None:
    r = z.zddctl("switch", target, *(("--force",) if target == "off" else ()))
    assert r.returncode == 0, r.stderr


def last_start(z) -> str:
    starts = [line for line in z.log().splitlines() if "event=start " in line]
    assert starts, z.log()
    return starts[-1]


def write_state(z, target: str) -> None:
    z.state_path.write_text(json.dumps({"target": target, "draining": "",
                                        "drain_deadline": 0.0}) + "\n")


def serves(lab, host: str) -> str:
    try:
        return http_get(lab.client, host, 8888, timeout=2)
    except ConnectionError:
        return "refused" if connect_error(lab.client, host, 8888)[0] == "ECONNREFUSED" else "?"


@pytest.mark.parametrize("target", ["main", "backup", "off"])
def test_kill_9_leaves_traffic_and_table_as_they_were(lab, target):
    z = lab.start_zddd({"initial": "backup" if target == "main" else "main"})
    kept = KeepAlive(lab.client, APP_V4, 8888)
    try:
        first = kept.get()
        switch(z, target)
        want = "refused" if target == "off" else target
        assert serves(lab, APP_V4) == serves(lab, APP_V6) == want
        before = z.data_plane()
        assert z.kill(signal.SIGKILL) == -signal.SIGKILL
        assert z.data_plane() == before
        assert z.steered_to() == target
        assert serves(lab, APP_V4) == serves(lab, APP_V6) == want
        if target != "off":
            assert http_get(lab.app, "127.0.0.1", 8888) == target
        assert kept.get() == first  # the connection opened before the switch and the kill
        assert z.data_plane() == before
    finally:
        kept.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_restart_adopts_without_a_flip(lab, sig):
    z = lab.start_zddd()
    switch(z, "backup")
    assert z.prop("LastSwitchUSec") > 0
    kept = KeepAlive(lab.client, APP_V4, 8888)
    try:
        assert kept.get() == "backup"
        before = z.data_plane()  # handles and pins included: a rewrite would change them
        monitor = nft_monitor(lab, z)  # an element flipped and flipped back keeps its handles
        rc = z.kill(sig)
        assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), z.log()
        z.start()
        assert monitor is None or monitor.changes() == [], "the kernel changed on restart"
        assert "how=adopted" in last_start(z) and "target=backup" in last_start(z)
        assert z.data_plane() == before, "the table was rewritten on adoption"
        assert z.prop("ActiveTarget") == "backup"
        # Nothing was committed by this process, so there is no commit time to report.
        assert z.prop("LastSwitchUSec") == 0
        assert kept.get() == "backup"
        assert http_get(lab.client, APP_V6, 8888) == "backup"
        # And it is in control: a switch works after adoption.
        switch(z, "main")
        assert http_get(lab.client, APP_V4, 8888) == "main"
        assert kept.get() == "backup"
    finally:
        kept.close()


def test_kernel_wins_over_the_state_file(lab):
    z = lab.start_zddd()
    switch(z, "backup")
    z.kill(signal.SIGKILL)
    write_state(z, "main")
    before = z.data_plane()
    z.start()
    assert "how=adopted" in last_start(z)
    assert z.prop("ActiveTarget") == "backup"
    assert z.steered_to() == "backup"
    assert z.data_plane() == before
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    # The saved desired state now agrees with the kernel.
    assert json.loads(z.state_path.read_text())["target"] == "backup"


def test_adopts_off_from_the_kernel(lab):
    z = lab.start_zddd()
    switch(z, "off")
    z.kill(signal.SIGKILL)
    write_state(z, "main")
    z.start()
    assert "how=adopted" in last_start(z)
    assert z.prop("ActiveTarget") == "off"
    assert serves(lab, APP_V4) == "refused"


@pytest.mark.parametrize("saved", ["backup", "off", "main"])
def test_no_table_restores_the_saved_target(lab, saved):
    (lab.tmp / "state.json").write_text(json.dumps({"target": saved}) + "\n")
    z = lab.start_zddd({"initial": "backup" if saved == "main" else "main"})
    assert "how=restored" in last_start(z), last_start(z)
    assert z.prop("ActiveTarget") == saved
    assert z.steered_to() == saved
    assert serves(lab, APP_V4) == ("refused" if saved == "off" else saved)


@pytest.mark.parametrize("state_file", [None, "not json {", '{"target": "Backup"}'],
                         ids=["absent", "garbage", "unknown-target"])
def test_neither_table_nor_state_uses_initial(lab, state_file):
    if state_file is not None:
        (lab.tmp / "state.json").write_text(state_file)
    z = lab.start_zddd({"initial": "backup"})
    assert "how=initial" in last_start(z), last_start(z)
    assert z.prop("ActiveTarget") == "backup"
    assert z.steered_to() == "backup"
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert json.loads(z.state_path.read_text())["target"] == "backup"


@pytest.mark.backends("nftables")
def test_a_damaged_table_is_adopted_and_repaired_at_start(lab):
    z = lab.start_zddd()
    switch(z, "backup")
    z.kill(signal.SIGKILL)
    clean = z.data_plane()
    lab.app.run("nft", "add rule inet zddd prerouting tcp dport 9999 drop")
    z.start()
    assert "how=adopted" in last_start(z) and "target=backup" in last_start(z)
    assert z.steered_to() == "backup"
    rules = [i["rule"] for i in z.nft()["nftables"] if "rule" in i]
    assert len(rules) == len([i for i in clean["nftables"] if "rule" in i])
    assert http_get(lab.client, APP_V4, 8888) == "backup"


def test_a_changed_target_port_while_down_is_taken_over_at_start(lab):
    from zdddlab import Vhost

    z = lab.start_zddd()
    switch(z, "backup")
    z.kill(signal.SIGKILL)
    other = Vhost(lab.app, 8081, "backup8081")
    lab.closers.append(other.stop)
    z.config["targets"] = {"backup": {"port": 8081}}
    z.write_config()
    z.start()
    # Every backend's data plane says "main's weight 0" (backup), whatever backup's port: the
    # steering is adopted and the new port laid out (tc and xdp held the port itself before
    # layout v2, and fell back to the saved state).
    assert "how=adopted" in last_start(z) and "target=backup" in last_start(z), last_start(z)
    assert z.prop("Targets")["backup"] == 8081
    assert http_get(lab.client, APP_V4, 8888) == "backup8081"


def test_losing_the_bus_exits_non_zero_and_leaves_the_data_plane(lab):
    z = lab.start_zddd()
    switch(z, "backup")
    before = z.data_plane()
    monitor = nft_monitor(lab, z)
    lab.bus.close()
    wait_for(lambda: z.proc.poll() is not None, 10, "zddd to exit without its bus")
    assert z.proc.returncode == 1, z.log()
    assert "event=bus_lost" in z.log()
    assert monitor is None or monitor.changes() == []
    assert z.data_plane() == before
    assert http_get(lab.client, APP_V4, 8888) == "backup"


@pytest.mark.parametrize("own_bus", [False, True], ids=["same-bus", "own-bus-and-state"])
def test_a_second_zddd_in_the_namespace_refuses_before_touching_the_kernel(lab, own_bus):
    """One zddd per data plane, whatever bus, config or state file the second one has: without
    the lock both would "repair" each other's table four times a second, forever."""
    from zdddlab import Bus, Zddd

    z = lab.start_zddd()
    switch(z, "backup")
    before = z.data_plane()
    monitor = nft_monitor(lab, z)
    second_tmp = lab.tmp / "second"
    second_tmp.mkdir()
    bus = lab.bus
    if own_bus:
        bus = Bus(second_tmp)
        lab.closers.append(bus.close)
    second = Zddd(lab.app, bus, second_tmp, {"initial": "main", "backend": z.backend,
                                             "bpf_pin_dir": z.config["bpf_pin_dir"]})
    lab.closers.append(second.close)
    second.start(wait=False)
    assert second.proc.wait(timeout=15) == 1, second.log()
    log = second.log()
    assert "holds this network namespace's data plane" in log and "(pid " in log, log
    if own_bus:
        assert not second.owns_name()  # it gave up before connecting to its bus
    time.sleep(0.6)  # two reconcile rounds of the first: nothing to repair either
    assert monitor is None or monitor.changes() == []
    assert z.data_plane() == before
    assert "drift_repaired" not in z.log()
    # The first one still answers and is in control.
    assert z.prop("ActiveTarget") == "backup"
    switch(z, "main")
    assert http_get(lab.client, APP_V4, 8888) == "main"
