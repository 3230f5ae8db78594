"""The kernel's interfaces zddd uses outside bcc and libnftables, one module each: `bpf`
(bpf(2): map elements, pins, object info, netns links), `bpffs` (the pin filesystem and whose
mount namespace it lives in), `pidfd` (another process' sockets), `netlink` (the one netlink
encoder and decoder) and the netlink families on it, `rtnetlink` (interfaces, qdiscs, tc
filters, XDP), `nfnetlink` (an nf_tables table's flags) and `sock_diag` (sockets by port and
state)."""
