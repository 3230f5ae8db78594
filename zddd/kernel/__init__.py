"""The kernel's interfaces zddd uses outside libraries, one module each: `netlink` (the one
netlink encoder and decoder) and the netlink families on it, `rtnetlink` (interfaces, qdiscs,
tc filters, XDP), `nfnetlink` (an nf_tables table's flags) and `sock_diag` (sockets by port
and state)."""
