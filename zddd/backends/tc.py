"""The `tc` backend: bpf/steer.c on the clsact ingress and egress hooks of the configured
interfaces. Everything but the ingress hook is shared with `xdp` (rewrite.py)."""

from __future__ import annotations

from .rewrite import RewriteBackend


class TcBackend(RewriteBackend):
    name = "tc"
    ingress_function = "zddd_ingress"
    ingress_hook = "ingress"
    ingress_program_type = "SCHED_CLS"
