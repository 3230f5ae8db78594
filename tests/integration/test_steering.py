"""Steering as a client sees it: every switch direction over IPv4 and IPv6, established
connections staying where they started, `off` refusing, loopback traffic, drift repair."""

import time

import pytest
from zdddlab import (APP_V4, APP_V6, KeepAlive, connect_error, http_get, scrape_metrics, wait_for)

pytestmark = [pytest.mark.backends, pytest.mark.beside]


def assert_serves(lab, target: str) -> None:
    """New connections from the client (IPv4 and IPv6) land on `target`, and the kernel's map
    says so; for off, connections to 8888 are refused."""
    assert lab.zddd.steered_to() == target
    for host in (APP_V4, APP_V6):
        if target == "off":
            err, _ = connect_error(lab.client, host, 8888)
            assert err == "ECONNREFUSED", f"{host}:8888 in off: {err}"
        else:
            assert http_get(lab.client, host, 8888) == target, f"{host}:8888"


def switch(z, target: str, *extra: str) -> None:
    r = z.zddctl("switch", target, *extra)
    assert r.returncode == 0, r.stderr
    assert z.prop("ActiveTarget") == target


def test_every_switch_direction_ipv4_and_ipv6(lab):
    z = lab.start_zddd()
    assert_serves(lab, "main")
    # main→backup→off→backup→main→off→main: each of the six directions once.
    for target in ("backup", "off", "backup", "main", "off", "main"):
        switch(z, target, *(("--force",) if target == "off" else ()))
        assert_serves(lab, target)
    # The vhosts themselves are never touched: direct connections still reach them.
    assert http_get(lab.client, APP_V4, 8080) == "main"
    assert http_get(lab.client, APP_V6, 80) == "backup"


def test_off_with_drain_timeout_zero_is_immediate(lab):
    z = lab.start_zddd({"drain_timeout": 0})
    r = z.zddctl("switch", "off")
    assert r.returncode == 0, r.stderr
    # SPEC: with drain_timeout = 0 the steering is removed at once, no drain.
    assert z.prop("ActiveTarget") == "off"
    assert z.prop("Draining") == ""
    assert_serves(lab, "off")
    switch(z, "backup")
    assert_serves(lab, "backup")


def test_off_via_dbus_option_drain_timeout_zero(lab):
    from zddd.service.dbus import Variant

    z = lab.start_zddd()
    err, _ = z.call("SwitchWithOptions", "sa{sv}", "off",
                    {"drain_timeout_usec": Variant("t", 0)})
    assert err is None, err
    assert z.prop("ActiveTarget") == "off"
    assert_serves(lab, "off")


@pytest.mark.parametrize("host", [APP_V4, APP_V6])
def test_keepalive_stays_on_main_while_new_connections_go_to_backup(lab, host):
    z = lab.start_zddd()
    kept = KeepAlive(lab.client, host, 8888)
    try:
        assert kept.get() == "main"
        switch(z, "backup")
        assert http_get(lab.client, host, 8888) == "backup"
        assert kept.get() == "main"
        assert kept.get() == "main"
    finally:
        kept.close()


def test_keepalive_on_backup_survives_off(lab):
    z = lab.start_zddd({"initial": "backup"})
    kept4 = KeepAlive(lab.client, APP_V4, 8888)
    kept6 = KeepAlive(lab.client, APP_V6, 8888)
    try:
        assert kept4.get() == "backup" and kept6.get() == "backup"
        switch(z, "off", "--force")
        assert_serves(lab, "off")
        # The NAT chains stay registered in off, so conntrack still translates these.
        assert kept4.get() == "backup" and kept6.get() == "backup"
        if z.backend == "nftables":
            listing = z.nft()["nftables"]
            hooks = {i["chain"]["name"] for i in listing if "chain" in i and "hook" in i["chain"]}
            assert hooks == {"prerouting", "output"}
    finally:
        kept4.close()
        kept6.close()


def test_off_refuses_quickly(lab):
    z = lab.start_zddd()
    switch(z, "off", "--force")
    for host in (APP_V4, APP_V6):
        err, took = connect_error(lab.client, host, 8888, timeout=3)
        assert err == "ECONNREFUSED"
        assert took < 0.5, f"refusal took {took:.3f} s"
    with pytest.raises(ConnectionError):
        http_get(lab.client, APP_V4, 8888, timeout=2)


def test_loopback_on_the_app_host_is_steered(lab):
    z = lab.start_zddd()
    for target in ("main", "backup"):
        if target != "main":
            switch(z, target)
        assert http_get(lab.app, "127.0.0.1", 8888) == target
        assert http_get(lab.app, "::1", 8888) == target
        # Its own address, from the host itself, goes through the output hook too.
        assert http_get(lab.app, APP_V4, 8888) == target
    switch(z, "off", "--force")
    assert connect_error(lab.app, "127.0.0.1", 8888)[0] == "ECONNREFUSED"
    assert connect_error(lab.app, "::1", 8888)[0] == "ECONNREFUSED"


# ---- drift repair ----------------------------------------------------------------------

REPAIR_DEADLINE = 1.5  # SPEC-ish promise is 1 s; margin for a loaded CI machine


def repairs(lab) -> float:
    return scrape_metrics(lab.app)["zddd_drift_repairs_total"]


def wait_repaired(lab, target: str, before: float) -> float:
    started = time.monotonic()
    wait_for(lambda: lab.zddd.steered_to() == target and repairs(lab) > before,
             REPAIR_DEADLINE, f"zddd to restore steering to {target}", interval=0.05)
    return time.monotonic() - started


@pytest.mark.backends("nftables")
@pytest.mark.parametrize("damage", [
    "delete table inet zddd",
    "flush map inet zddd steer",
    "add rule inet zddd prerouting tcp dport 9999 drop",
    # Someone else steers to main: one batch, as an operator's script would.
    "flush map inet zddd steer; add element inet zddd steer { 8888 : goto steer_main }",
    "delete chain inet zddd output",
    "add element inet zddd steer { 9999 : goto steer_main }",
    "add set inet zddd extra { type ipv4_addr; }",
], ids=["delete-table", "flush-map", "add-rule", "foreign-element", "delete-hook",
        "extra-element", "extra-set"])
def test_drift_is_repaired(lab, damage):
    z = lab.start_zddd()
    switch(z, "backup")
    clean = strip_handles(z.nft())
    before = repairs(lab)
    assert before == 0
    lab.app.run("nft", damage)
    took = wait_repaired(lab, "backup", before)
    assert strip_handles(z.nft()) == clean, f"not restored exactly (after {took:.2f} s)"
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert http_get(lab.app, "127.0.0.1", 8888) == "backup"
    assert repairs(lab) == before + 1
    assert "event=drift_repaired" in z.log()


@pytest.mark.backends("nftables")
@pytest.mark.parametrize("damage", [
    "flush map inet zddd steer",
    "add rule inet zddd prerouting tcp dport 9999 drop",
    "delete rule inet zddd steer_main handle {steer_main}",
], ids=["flush-map", "add-rule", "delete-steer-rule"])
def test_established_connections_survive_a_repair(lab, damage):
    z = lab.start_zddd()
    kept = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(kept.close)
    assert kept.get() == "main"
    switch(z, "backup")
    handles = {i["rule"]["chain"]: i["rule"]["handle"] for i in z.nft()["nftables"]
               if "rule" in i}
    lab.app.run("nft", damage.format(**handles))
    wait_repaired(lab, "backup", 0)
    assert kept.get() == "main"
    assert http_get(lab.client, APP_V4, 8888) == "backup"


@pytest.mark.backends("nftables")
def test_drift_repaired_in_off_too(lab):
    z = lab.start_zddd()
    switch(z, "off", "--force")
    lab.app.run("nft", "add element inet zddd steer { 8888 : goto steer_main }")
    wait_repaired(lab, "off", 0)
    assert connect_error(lab.client, APP_V4, 8888)[0] == "ECONNREFUSED"


def strip_handles(listing: dict) -> list:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("handle", "packets", "bytes")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(listing.get("nftables", []))


def test_traffic_routed_through_the_host_is_not_steered(lab):
    """fib daddr type local: port 8888 of another machine behind the app host stays its own."""
    from zdddlab import NetNS, Vhost, link

    far = NetNS("far")
    lab.closers.append(far.close)
    link(lab.app, far, ("203.0.113.1", "2001:db8:1::1"), ("203.0.113.2", "2001:db8:1::2"))
    lab.app.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    lab.app.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    lab.client.run("ip", "route", "add", "203.0.113.0/24", "via", APP_V4)
    lab.client.run("ip", "-6", "route", "add", "2001:db8:1::/64", "via", APP_V6)
    far.run("ip", "route", "add", "default", "via", "203.0.113.1")
    far.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    far_vhost = Vhost(far, 8888, "far")
    lab.closers.append(far_vhost.stop)
    z = lab.start_zddd()
    for target in ("main", "off"):
        if target == "off":
            switch(z, "off", "--force")
        assert http_get(lab.client, "203.0.113.2", 8888) == "far"
        assert http_get(lab.client, "2001:db8:1::2", 8888) == "far"
    switch(z, "backup")
    assert http_get(lab.client, "203.0.113.2", 8888) == "far"
    assert http_get(lab.client, APP_V4, 8888) == "backup"


# Someone takes out part of a BPF data plane by hand; zddd puts it back and counts it.
BPF_DAMAGE = {
    "tc": "tc filter del dev lo ingress",
    "xdp": "ip link set dev lo xdpgeneric off",
    "sk_lookup": "rm -f {pin_dir}/sk_lookup_link",
}


@pytest.mark.backends("tc", "xdp", "sk_lookup")
def test_bpf_drift_is_repaired_and_kept_connections_survive(lab):
    z = lab.start_zddd()
    kept = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(kept.close)
    assert kept.get() == "main"
    before = repairs(lab)
    lab.app.run("sh", "-c", BPF_DAMAGE[z.backend].format(pin_dir=z.config["bpf_pin_dir"]))
    took = wait_repaired(lab, "main", before)
    assert took < REPAIR_DEADLINE
    assert http_get(lab.app, "127.0.0.1", 8888) == "main"
    assert http_get(lab.client, APP_V4, 8888) == "main"
    assert kept.get() == "main"
    before_plane = z.data_plane()
    time.sleep(0.6)
    assert z.data_plane() == before_plane  # repaired once, then left alone
