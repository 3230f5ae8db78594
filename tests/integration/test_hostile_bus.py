"""Odd strings on the bus: whatever a caller sends, zddd answers with its named error and stays
connected. Sent with busctl (sd-bus marshals correctly), so the bytes on the wire are exactly
what a hostile caller would send; run on Debian's dbus-fast, which zddd's replies go through."""

import subprocess

import pytest
from zdddlab import APP_V4, http_get

E = "org.zddd.Steering1.Error."
DEST = ("org.zddd.Steering1", "/org/zddd/Steering1", "org.zddd.Steering1.Manager")

ODD = [
    "été",                      # two-byte UTF-8
    "Été",
    "目標",                     # three-byte
    "🙂main",                   # four-byte
    "main\x01\x7f\t\n",         # control characters
    "x" * 65536,                # 64 KiB
    "é" * 40000,                # 80 KB of two-byte characters
]


def busctl(z, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["busctl", f"--address={z.bus.address}", *args],
                          capture_output=True, text=True, timeout=30)


def assert_still_serving(z) -> None:
    assert z.proc.poll() is None, f"zddd exited:\n{z.log()}"
    assert z.owns_name(), "zddd lost its bus name"
    assert z.prop("ActiveTarget") == "main"
    assert "bus_lost" not in z.log()
    assert "Traceback" not in z.log()


@pytest.mark.parametrize("text", ODD, ids=lambda t: f"len{len(t)}-{t[:4]!r}")
def test_odd_targets_get_invalid_target_and_zddd_stays_connected(lab, text):
    z = lab.start_zddd()
    for args in (("Switch", "s", text), ("SwitchWithOptions", "sa{sv}", text, "0"),
                 ("WaitDrained", "st", text, "0")):
        r = busctl(z, "call", *DEST, *args)
        assert r.returncode != 0
        assert "unknown target" in r.stderr, r.stderr
        assert_still_serving(z)
    # The reply echoes the target: it must arrive whole (sd-bus validated it).
    if len(text) < 100 and text.isprintable():
        r = busctl(z, "call", *DEST, "Switch", "s", text)
        assert text in r.stderr
    assert http_get(lab.client, APP_V4, 8888) == "main"


@pytest.mark.parametrize("name", ["Été", "目標", "x" * 65536, "Active\x01Target"],
                         ids=["e-acute", "cjk", "64k", "control"])
def test_odd_property_names_get_an_error_and_zddd_stays_connected(lab, name):
    # The policy lets anyone read properties: the library's own "unknown property" reply
    # echoes the name, and must not be malformed either.
    z = lab.start_zddd()
    r = busctl(z, "get-property", *DEST, name)
    assert r.returncode != 0
    assert_still_serving(z)


def test_odd_option_names_get_invalid_argument(lab):
    z = lab.start_zddd()
    r = busctl(z, "call", *DEST, "SwitchWithOptions", "sa{sv}", "off", "1", "forcé", "b",
               "true")
    assert r.returncode != 0 and "unknown option" in r.stderr, r.stderr
    assert_still_serving(z)


def test_zddctl_with_a_non_ascii_target_reports_invalid_target(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "été")
    assert r.returncode == 1, r
    assert "InvalidTarget" in r.stderr and "été" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert_still_serving(z)
