"""The netlink families on zddd's codec (zddd.kernel) against the real kernel, each reading
back what the test set up in a network namespace of its own: rtnetlink (a veth, its
clsact qdisc, a cls_bpf filter, an XDP program attached and detached), nf_tables (a table's
flags) and sock_diag (listeners and established connections by port). The reads run in a
script inside the namespace, as zddd would."""

from __future__ import annotations

import json

import pytest
from zdddlab import VENV_BIN, NetNS

pytestmark = pytest.mark.usefixtures("need_root")


@pytest.fixture
def ns():
    netns = NetNS("nl")
    yield netns
    netns.close()


def run_inside(ns: NetNS, script: str) -> dict:
    r = ns.run(str(VENV_BIN / "python"), "-c", script, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


RTNETLINK = r"""
import ctypes, json, struct
from pyroute2 import IPRoute
from zddd.kernel import bpf as bpfsys
from zddd.kernel import rtnetlink

def load(prog_type, verdict):
    # r0 = verdict; exit
    insns = struct.pack("=BBhiBBhi", 0xb7, 0, 0, verdict, 0x95, 0, 0, 0)
    ibuf, lbuf = ctypes.create_string_buffer(insns), ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("=IIQQIIQII16s", prog_type, 2, bpfsys._addr(ibuf), bpfsys._addr(lbuf),
                       0, 0, 0, 0, 0, b"zt_netlink")
    return bpfsys._bpf(5, attr)  # BPF_PROG_LOAD

index = next(link.index for link in rtnetlink.links() if link.name == "zt0")
tc_fd = load(bpfsys.BPF_PROG_TYPE_SCHED_CLS, 0)
xdp_fd = load(bpfsys.BPF_PROG_TYPE_XDP, 2)  # XDP_PASS
IPRoute().tc("add-filter", "bpf", index, handle=1, fd=tc_fd, name="zt-ingress",
             parent=0xFFFFFFF2, prio=7, classid=1, direct_action=True)
rtnetlink.xdp_set(index, xdp_fd, 2)  # XDP_FLAGS_SKB_MODE
attached = [l for l in rtnetlink.links() if l.index == index][0]
rtnetlink.xdp_set(index, -1, 2)
detached = [l for l in rtnetlink.links() if l.index == index][0]
try:
    rtnetlink.xdp_set(0x7FFFFFF0, -1, 2)
    refused = None
except OSError as e:
    refused = [e.errno, e.strerror]
print(json.dumps({
    "index": index, "tc_id": bpfsys.prog_info(tc_fd).id, "xdp_id": bpfsys.prog_info(xdp_fd).id,
    "attached": [attached.name, attached.xdp_skb, attached.xdp_drv, attached.xdp_any],
    "detached": [detached.xdp_skb, detached.xdp_any],
    "qdiscs": rtnetlink.qdisc_kinds(),
    "ingress": rtnetlink.bpf_filters(index, 0xFFFFFFF2),
    "egress": rtnetlink.bpf_filters(index, 0xFFFFFFF3),
    "no_such_interface": rtnetlink.bpf_filters(0x7FFFFFF0, 0xFFFFFFF2),
    "refused": refused}))
"""


def test_rtnetlink_reads_back_an_interface_its_qdisc_filter_and_xdp_program(ns):
    ns.run("ip", "link", "add", "zt0", "type", "veth", "peer", "name", "zt1")
    ns.run("ip", "link", "set", "zt0", "up")
    ns.run("tc", "qdisc", "add", "dev", "zt0", "clsact")
    got = run_inside(ns, RTNETLINK)
    index = got["index"]
    assert [index, "clsact"] in got["qdiscs"]
    assert got["ingress"] == [[7, 1, "zt-ingress", got["tc_id"]]]
    assert got["egress"] == [] and got["no_such_interface"] == []
    assert got["attached"] == ["zt0", got["xdp_id"], 0, got["xdp_id"]]
    assert got["detached"] == [0, 0]
    assert got["refused"][0] == 19  # ENODEV
    assert "XDP on interface 2147483632" in got["refused"][1]


NFNETLINK = r"""
import json
from zddd.kernel import nfnetlink
with nfnetlink.open_socket() as sock:
    print(json.dumps({name: nfnetlink.table_flags(sock, name)
                      for name in ("zt_plain", "zt_dormant", "zt_missing")}))
"""


def test_nfnetlink_reads_a_tables_flags_and_sees_a_missing_table(ns):
    ns.run("nft", "add", "table", "inet", "zt_plain")
    ns.run("nft", "add", "table", "inet", "zt_dormant", "{ flags dormant; }")
    got = run_inside(ns, NFNETLINK)
    assert got == {"zt_plain": 0, "zt_dormant": 1, "zt_missing": None}  # NFT_TABLE_F_DORMANT


SOCK_DIAG = r"""
import json, socket
from zddd.connections import ConnectionCounter
from zddd.kernel.sock_diag import TCP_LISTEN, dump_sockets

main = socket.create_server(("127.0.0.1", 8080))
backup = socket.create_server(("::", 80), family=socket.AF_INET6, dualstack_ipv6=True)
other = socket.create_server(("127.0.0.1", 9000))
held = []
for listener, host, n in ((main, "127.0.0.1", 3), (backup, "::1", 2), (backup, "127.0.0.1", 1),
                          (other, "127.0.0.1", 4)):
    for _ in range(n):
        held += [socket.create_connection((host, listener.getsockname()[1])), listener.accept()[0]]
listening = sorted((s.family, s.local_port)
                   for s in dump_sockets([80, 8080, 9000], 1 << TCP_LISTEN))
print(json.dumps({"counts": ConnectionCounter().count({"main": 8080, "backup": 80}),
                  "listening": listening}))
"""


def test_sock_diag_counts_the_connections_and_finds_the_listeners_set_up(ns):
    got = run_inside(ns, SOCK_DIAG)
    assert got["counts"] == {"main": 3, "backup": 3}
    assert got["listening"] == [[2, 8080], [2, 9000], [10, 80]]  # AF_INET 2, AF_INET6 10
