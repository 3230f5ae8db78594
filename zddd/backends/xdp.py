"""The `xdp` backend: bpf/steer.c's ingress in XDP (native, or generic on lo and with
`xdp_mode = "generic"`), its egress on clsact egress. Everything but the ingress hook is shared
with `tc` (rewrite.py)."""

from __future__ import annotations

from .rewrite import RewriteBackend


class XdpBackend(RewriteBackend):
    name = "xdp"
    ingress_function = "zddd_xdp"
    ingress_hook = "xdp"
    ingress_program_type = "XDP"
