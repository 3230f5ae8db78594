"""zddd's lab: real network namespaces, a private D-Bus, zddd, vhosts, nginx, HAProxy and a
load generator, shared by the tests (tests/conftest.py), the demo (examples/demo.py) and the
bench (bench/). Callers write `from zdddlab import NetNS, Zddd, ...` or `zdddlab.cluster(...)`;
every public name of the modules below is here.

Modules, by concern: base (paths, LabError, wait_for, processes), net (NetNS, link, bridge),
bus (Bus, dbus_call, SignalWatcher), daemons (Zddd, Vhost, HAProxy), probes (http_get,
KeepAlive, HeldConnection, ...), lab (Lab, AppLab, cluster), loadgen (`python -m
zdddlab.loadgen`), switched (`python -m zdddlab.switched`, SignalWatcher's child).

Not part of the Debian package: `make setup` puts the checkout on the venv's path (a .pth file),
so .venv/bin/python imports it from anywhere. Run as root.
"""

from .base import (EXAMPLES, PYTHON, REPO, VENV_BIN, LabError, Proc, interrupted, run, run_main,
                   wait_for)
from .bus import (BUS_CONFIG, BUS_NAME, INTERFACE, OBJECT_PATH, POLICY, PROPERTIES, Bus,
                  SignalWatcher, bus_call, connect, dbus_call, name_has_owner)
from .daemons import (NGINX_CONF, STEERING_READERS, HAProxy, Vhost, Zddd, lab_haproxy_config,
                      public_package, read_nftables, read_with_zddd, to_toml)
from .lab import (APP_ADDRS, APP_V4, APP_V6, CLIENT_ADDR, CLIENT_V4, CLIENT_V6, HAPROXY_CONFIGS,
                  LB_APP_ADDR, LB_CLIENT_ADDR, AppLab, AppServer, Cluster, Lab, LoadGen, cluster)
from .net import NetNS, bridge, link, ns_name
from .probes import (HeldConnection, KeepAlive, NftMonitor, agent_ask, connect_error, http_get,
                     port_open, scrape_metrics, without_counters)

__all__ = [
    "EXAMPLES", "PYTHON", "REPO", "VENV_BIN", "LabError", "Proc", "interrupted", "run",
    "run_main", "wait_for",
    "BUS_CONFIG", "BUS_NAME", "INTERFACE", "OBJECT_PATH", "POLICY", "PROPERTIES", "Bus",
    "SignalWatcher",
    "bus_call", "connect", "dbus_call", "name_has_owner",
    "NGINX_CONF", "STEERING_READERS", "HAProxy", "Vhost", "Zddd", "lab_haproxy_config",
    "public_package", "read_nftables", "read_with_zddd", "to_toml",
    "APP_ADDRS", "APP_V4", "APP_V6", "CLIENT_ADDR", "CLIENT_V4", "CLIENT_V6", "HAPROXY_CONFIGS",
    "LB_APP_ADDR", "LB_CLIENT_ADDR", "AppLab", "AppServer", "Cluster", "Lab", "LoadGen",
    "cluster",
    "NetNS", "bridge", "link", "ns_name",
    "HeldConnection", "KeepAlive", "NftMonitor", "agent_ask", "connect_error", "http_get",
    "port_open", "scrape_metrics", "without_counters",
]
