"""probe() of the tc/xdp backends where they cannot run: one line that says what is missing
and points to the nftables backend, said before anything touches the kernel."""

import sys

import pytest

from zddd.backends import BackendUnavailable, backend_class
from zddd.backends import pinned, rewrite


@pytest.fixture(params=["tc", "xdp"])
def backend(request, monkeypatch):
    def no_compile(*args):
        raise AssertionError("probe compiled although it should have given up first")

    instance = backend_class(request.param)()
    monkeypatch.setattr(instance, "_compile", no_compile)
    return instance


def test_no_kernel_headers(backend, monkeypatch, tmp_path):
    pytest.importorskip("bcc")
    monkeypatch.setattr(pinned, "MODULES_DIR", tmp_path)
    with pytest.raises(BackendUnavailable) as e:
        backend.probe()
    text = str(e.value)
    release = __import__("os").uname().release
    assert text.startswith(f"no kernel headers for {release}")
    assert f"apt-get install linux-headers-{release}" in text
    assert text.endswith('use backend = "nftables"') and "\n" not in text


def test_no_bcc(backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(BackendUnavailable) as e:
        backend.probe()
    assert "apt-get install python3-bpfcc" in str(e.value)
    assert 'backend = "nftables"' in str(e.value) and "\n" not in str(e.value)


def test_source_found():
    assert rewrite.source_path().name == "steer.c" and rewrite.source_path().exists()


def test_build_flags_and_stamp_follow_the_config():
    """The services are map data: a build depends on the flow map's size and the source."""
    one = rewrite.Flavour(1024)
    other = rewrite.Flavour(2048)
    assert f"-DMAX_SERVICES={rewrite.MAX_SERVICES}" in one.cflags(None)
    assert not any("PORT" in flag for flag in one.cflags(None))
    assert '-DPIN_DIR="/sys/fs/bpf/zddd/tc"' in one.cflags("/sys/fs/bpf/zddd/tc")
    assert one.digest(b"source") != other.digest(b"source")
    assert one.digest(b"source") != one.digest(b"source 2")
    assert len(one.stamp(b"source")) == rewrite.STAMP_SIZE
