"""The TOML configuration, parsed into frozen dataclasses.

Everything is validated here, before anything touches the kernel. Every error names the key it is
about, so an operator can find the line to fix.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .api import MAX_SECONDS

DEFAULT_PATH = "/etc/zddd/zddd.toml"
TARGET_NAMES = ("main", "backup")
OFF = "off"
SPLIT = "split"  # ActiveTarget while both targets get new connections (weights)
ALL_TARGETS = TARGET_NAMES + (OFF,)
BACKENDS = ("nftables", "tc", "xdp", "sk_lookup")
# Keys whose change a running daemon cannot take over: they name what it owns in the kernel.
RESTART_KEYS = ("backend", "bpf_pin_dir", "bpf_flow_entries")
MAX_HOST = 260  # the longest health.host: a 253-character DNS name and ":65535"
# Linux' IFNAMSIZ is 16 bytes with the terminating NUL.
MAX_IFNAME_BYTES = 15


class ConfigError(ValueError):
    """An invalid configuration. `key` is the dotted key at fault ("" for the file itself)."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


@dataclass(frozen=True)
class Health:
    """How a target is probed: kind is "tcp", "http" (with path) or "none"; at `address` (None:
    the loopback, 127.0.0.1 then ::1), with `host` as HTTP's Host header. Up after `rise`
    passed probes in a row, down after `fall` failed ones (HAProxy's words); the first probe
    decides alone."""

    kind: str = "tcp"
    path: str = ""
    host: str = "localhost"
    address: str | None = None
    rise: int = 1
    fall: int = 1

    def __str__(self) -> str:
        return f"http:{self.path}" if self.kind == "http" else self.kind


# The probe settings of [health] that [targets.NAME] may override as health_KEY, and the
# Health field each sets.
PROBE_KEYS = ("rise", "fall", "host", "address")
# A count of probes in a row: HAProxy allows far more, but a minute of 1-second probes is
# already longer than anyone waits for a verdict.
MAX_PROBE_COUNT = 1000


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    health: Health = Health()


@dataclass(frozen=True)
class Endpoint:
    """A listen address; `host` is an IP literal ("::" listens on IPv4 and IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_SERVICE = "default"
SERVICE_NAME = r"^[a-z][a-z0-9_]{0,31}$"


@dataclass(frozen=True)
class Service:
    """One steered service: a listen port, its targets, where it starts, how long its drains
    may take, and its HAProxy agent (None: none)."""

    name: str
    listen_port: int
    targets: dict[str, Target]
    initial: str = "main"
    drain_timeout: float = 30.0
    agent_listen: Endpoint | None = None
    agent_weights: bool = False


@dataclass(frozen=True)
class Config:
    listen_port: int = 8888
    backend: str = "nftables"
    interfaces: tuple[str, ...] | None = None  # None: every interface up, looked up at each read
    xdp_mode: str = "native"
    bpf_pin_dir: str = "/sys/fs/bpf/zddd"
    bpf_flow_entries: int = 1048576
    initial: str = "main"
    state_file: str = "/var/lib/zddd/state.json"
    drain_timeout: float = 30.0
    targets: dict[str, Target] = field(
        default_factory=lambda: {
            "main": Target("main", 8080),
            "backup": Target("backup", 80),
        }
    )
    health_interval: float = 1.0
    health_timeout: float = 0.5
    agent_listen: Endpoint | None = Endpoint("::", 8889)
    agent_weights: bool = False
    metrics_listen: Endpoint | None = Endpoint("127.0.0.1", 9488)

    # The [services.NAME] tables, by name; empty in the single-service form, where the
    # top-level listen_port, initial, drain_timeout, targets and agent are service "default".
    service_tables: dict[str, Service] = field(default_factory=dict)

    @property
    def services(self) -> dict[str, Service]:
        """Every service by name, sorted by name."""
        if self.service_tables:
            return dict(sorted(self.service_tables.items()))
        return {DEFAULT_SERVICE: Service(DEFAULT_SERVICE, self.listen_port, self.targets,
                                         self.initial, self.drain_timeout, self.agent_listen,
                                         self.agent_weights)}

    @property
    def single(self) -> bool:
        """The single-service form (top-level listen_port and [targets.*])."""
        return not self.service_tables

    def service_key(self, name: str, key: str) -> str:
        """The config key of a service's setting, as the operator wrote it."""
        return key if self.single else f"services.{name}.{key}"

    def restart_changes(self, new: "Config") -> list[str]:
        """The keys that differ between self and new and that only a restart can apply: the
        global ones, and a listen or target port of a service both configs have (a target
        port in the single-service form excepted, as before services)."""
        changed = [k for k in RESTART_KEYS if getattr(self, k) != getattr(new, k)]
        mine = self.services
        for name, service in new.services.items():
            old = mine.get(name)
            if old is None:
                continue
            if old.listen_port != service.listen_port:
                changed.append(new.service_key(name, "listen_port"))
            if self.single and new.single:
                continue  # the single form has always taken a new target port at reload
            for target in TARGET_NAMES:
                if old.targets[target].port != service.targets[target].port:
                    changed.append(new.service_key(name, f"targets.{target}.port"))
        return changed


# The keys of one service: top-level in the single-service form, in [services.NAME] otherwise.
_SERVICE_KEYS = {"listen_port", "initial", "drain_timeout", "targets", "agent"}
_SCHEMA_TOP = {
    "backend", "interfaces", "xdp_mode", "bpf_pin_dir", "bpf_flow_entries", "state_file",
    "health", "metrics", "services", *_SERVICE_KEYS,
}
MAX_SERVICES = 256


def _expect(value: Any, types: type | tuple[type, ...], key: str, what: str) -> Any:
    # bool is an int in Python; TOML's true must never pass for a port or a number.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(key, f"must be {what}, not a boolean")
    if not isinstance(value, types):
        raise ConfigError(key, f"must be {what}, not {type(value).__name__} {value!r}")
    return value


def _port(value: Any, key: str) -> int:
    _expect(value, int, key, "an integer port")
    if not 1 <= value <= 65535:
        raise ConfigError(key, f"port {value} is out of range 1-65535")
    return value


def _seconds(value: Any, key: str, *, allow_zero: bool) -> float:
    _expect(value, (int, float), key, "a number of seconds")
    # Not finite (TOML's inf, nan) or huge (TOML integers have no bound in tomllib) would
    # overflow where seconds become µs (DrainTimeoutUSec) or a timer's deadline.
    if isinstance(value, int) and abs(value) > MAX_SECONDS:
        raise ConfigError(key, f"{value} is out of range 0-{MAX_SECONDS} seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"{value} is not a valid duration")
    if value > MAX_SECONDS:
        raise ConfigError(key, f"{value} is out of range 0-{MAX_SECONDS} seconds")
    return float(value)


def _no_control(value: str, key: str, what: str) -> str:
    # A NUL cannot reach the kernel (paths, names) and other control characters are never meant.
    if any(not c.isprintable() for c in value):
        raise ConfigError(key, f"{value!r} is not a valid {what}: control character")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    _expect(value, str, key, "a string")
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _unknown(table: dict, allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown key")


def parse_health(value: Any, key: str) -> Health:
    _expect(value, str, key, 'a string ("tcp", "http:/path" or "none")')
    if value in ("tcp", "none"):
        return Health(value)
    # The path goes into the request line as it is: printable ASCII without spaces only.
    if value.startswith("http:/") and all(c.isascii() and c.isprintable() and not c.isspace()
                                          for c in value):
        return Health("http", value[len("http:"):])
    raise ConfigError(key, f'{value!r} is not "tcp", "http:/path" or "none"')


def _probe_count(value: Any, key: str) -> int:
    _expect(value, int, key, "an integer count of probes")
    if not 1 <= value <= MAX_PROBE_COUNT:
        raise ConfigError(key, f"{value} is out of range 1-{MAX_PROBE_COUNT}")
    return value


def _probe_host(value: Any, key: str) -> str:
    # It goes into the request as a header line: a host name or address, with a port if
    # wanted, and nothing that could end the line or the header.
    _expect(value, str, key, "a host name for the HTTP Host header")
    if not value or not all(c.isascii() and c.isprintable() and not c.isspace() for c in value):
        raise ConfigError(key, f"{value!r} is not a valid Host header value")
    if len(value) > MAX_HOST:  # a DNS name (253) and a port; longer only makes the app answer 400
        raise ConfigError(key, f"is {len(value)} characters long; at most {MAX_HOST}")
    return value


def _probe_address(value: Any, key: str) -> str | None:
    _expect(value, str, key, 'an IP address or "" (the loopback)')
    if value == "":
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(key, f"{value!r} is not an IP address") from None


_PROBE_PARSERS = {"rise": _probe_count, "fall": _probe_count, "host": _probe_host,
                  "address": _probe_address}


def parse_probe_settings(table: dict, section: str, prefix: str, defaults: dict) -> dict:
    """`defaults` with the probe settings that `table` (the config's `section`, e.g.
    "targets.main.") has as `prefix` + a name of PROBE_KEYS."""
    found = dict(defaults)
    for name in PROBE_KEYS:
        if prefix + name in table:
            key = prefix + name
            found[name] = _PROBE_PARSERS[name](table[key], section + key)
    return found


def parse_endpoint(value: Any, key: str) -> Endpoint | None:
    _expect(value, str, key, 'a string "host:port" or ""')
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    # isascii: str.isdigit() also takes digits like "²" that int() refuses.
    if not sep or not (port.isascii() and port.isdigit()):
        raise ConfigError(key, f"{value!r} is not host:port (IPv6 as [addr]:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address") from None
    if addr.version != version:
        raise ConfigError(key, f"{value!r}: write IPv6 addresses in brackets, [addr]:port")
    return Endpoint(str(addr), _port(int(port), key))


def from_dict(data: dict) -> Config:
    """Build a Config from parsed TOML; raises ConfigError naming the key at fault."""
    _unknown(data, _SCHEMA_TOP, "")
    defaults = Config()
    kw: dict[str, Any] = {}
    if "backend" in data:
        kw["backend"] = _choice(data["backend"], "backend", BACKENDS)
    if "interfaces" in data:
        ifaces = _expect(data["interfaces"], list, "interfaces", "a list of interface names")
        for i, name in enumerate(ifaces):
            _expect(name, str, f"interfaces[{i}]", "an interface name")
            # The kernel's own rule (dev_valid_name): at most 15 bytes, no "/", ":" or space.
            if (not name or name in (".", "..") or len(name.encode()) > MAX_IFNAME_BYTES
                    or any(c in "/:" or c.isspace() or not c.isprintable() for c in name)):
                raise ConfigError(f"interfaces[{i}]", f"{name!r} is not a valid interface name")
        kw["interfaces"] = tuple(ifaces)
    if "xdp_mode" in data:
        kw["xdp_mode"] = _choice(data["xdp_mode"], "xdp_mode", ("native", "generic"))
    for key in ("bpf_pin_dir", "state_file"):
        if key in data:
            value = _expect(data[key], str, key, "an absolute path")
            if not value.startswith("/"):
                raise ConfigError(key, f"{value!r} is not an absolute path")
            kw[key] = _no_control(value, key, "path")
    if "bpf_flow_entries" in data:
        value = _expect(data["bpf_flow_entries"], int, "bpf_flow_entries", "an integer")
        if not 1024 <= value <= 1 << 26:
            raise ConfigError("bpf_flow_entries", f"{value} is out of range 1024-{1 << 26}")
        kw["bpf_flow_entries"] = value
    probing = {name: getattr(Health(), name) for name in PROBE_KEYS}
    if "health" in data:
        table = _expect(data["health"], dict, "health", "a table ([health])")
        _unknown(table, {"interval", "timeout", *PROBE_KEYS}, "health.")
        if "interval" in table:
            kw["health_interval"] = _seconds(table["interval"], "health.interval", allow_zero=False)
        if "timeout" in table:
            kw["health_timeout"] = _seconds(table["timeout"], "health.timeout", allow_zero=False)
        probing = parse_probe_settings(table, "health.", "", probing)

    if "metrics" in data:
        table = _expect(data["metrics"], dict, "metrics", "a table ([metrics])")
        _unknown(table, {"listen"}, "metrics.")
        if "listen" in table:
            kw["metrics_listen"] = parse_endpoint(table["listen"], "metrics.listen")

    if "services" in data:
        mixed = sorted(_SERVICE_KEYS & set(data))
        if mixed:
            raise ConfigError(mixed[0], "not allowed with [services.*]: a file has either the "
                              "top-level service keys or [services.NAME] tables")
        table = _expect(data["services"], dict, "services", "a table of [services.NAME]")
        if not table:
            raise ConfigError("services", "names no service")
        if len(table) > MAX_SERVICES:
            raise ConfigError("services", f"has {len(table)} services; at most {MAX_SERVICES}")
        services = {}
        for name, spec in table.items():
            key = f"services.{name}"
            if not re.fullmatch(SERVICE_NAME, name):
                raise ConfigError(key, f"{name!r} is not a service name "
                                  "(a-z first, then a-z, 0-9 or _, at most 32)")
            spec = _expect(spec, dict, key, "a table")
            _unknown(spec, _SERVICE_KEYS, key + ".")
            if "listen_port" not in spec:
                raise ConfigError(key + ".listen_port", "is required")
            services[name] = _service(name, spec, key + ".", probing, defaults, single=False)
        kw["service_tables"] = services
    else:
        one = _service(DEFAULT_SERVICE, data, "", probing, defaults, single=True)
        kw.update(listen_port=one.listen_port, initial=one.initial,
                  drain_timeout=one.drain_timeout, targets=one.targets,
                  agent_listen=one.agent_listen, agent_weights=one.agent_weights)
    config = Config(**kw)
    _check_ports(config)
    return config


def _service(name: str, data: dict, prefix: str, probing: dict, defaults: Config, *,
             single: bool) -> Service:
    """One service from its table (`data`, whose keys are named `prefix` + key)."""
    listen = (_port(data["listen_port"], prefix + "listen_port") if "listen_port" in data
              else defaults.listen_port)
    initial = (_choice(data["initial"], prefix + "initial", ALL_TARGETS) if "initial" in data
               else defaults.initial)
    drain_timeout = (_seconds(data["drain_timeout"], prefix + "drain_timeout", allow_zero=True)
                     if "drain_timeout" in data else defaults.drain_timeout)
    targets = {}
    table = _expect(data.get("targets", {}), dict, prefix + "targets", "a table")
    _unknown(table, set(TARGET_NAMES), prefix + "targets.")
    for target in TARGET_NAMES:
        key = f"{prefix}targets.{target}"
        spec = _expect(table.get(target, {}), dict, key, "a table")
        _unknown(spec, {"port", "health", *(f"health_{k}" for k in PROBE_KEYS)}, key + ".")
        if "port" in spec:
            port = _port(spec["port"], key + ".port")
        elif single:
            port = defaults.targets[target].port
        else:
            raise ConfigError(key + ".port", "is required")
        health = (parse_health(spec["health"], key + ".health")
                  if "health" in spec else defaults.targets[target].health)
        settings = parse_probe_settings(spec, key + ".", "health_", probing)
        targets[target] = Target(target, port, replace(health, **settings))
    agent = defaults.agent_listen if single else None
    weights = False
    if "agent" in data:
        table = _expect(data["agent"], dict, prefix + "agent", f"a table ([{prefix}agent])")
        _unknown(table, {"listen", "weights"}, prefix + "agent.")
        if "listen" in table:
            agent = parse_endpoint(table["listen"], prefix + "agent.listen")
        if "weights" in table:
            weights = _expect(table["weights"], bool, prefix + "agent.weights", "true or false")
    return Service(name, listen, targets, initial, drain_timeout, agent, weights)


def _check_ports(config: Config) -> None:
    """Two roles on one port would make zddd steer into itself or fight its own vhosts."""
    owners: dict[int, str] = {}
    claims = []
    for service in config.services.values():
        def named(key: str, name: str = service.name) -> str:
            return config.service_key(name, key)
        claims.append((named("listen_port"), service.listen_port))
        claims += [(named(f"targets.{t.name}.port"), t.port) for t in service.targets.values()]
        if service.agent_listen:
            claims.append((named("agent.listen"), service.agent_listen.port))
    if config.metrics_listen:
        claims.append(("metrics.listen", config.metrics_listen.port))
    for key, port in claims:
        if port in owners:
            raise ConfigError(key, f"port {port} is already used by {owners[port]}")
        owners[port] = key


def load(path: str | Path | None) -> Config:
    """Read and validate a config file. A missing file at the default path gives the defaults."""
    if path is None:
        path = DEFAULT_PATH
        if not Path(path).exists():
            return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays and tables
        raise ConfigError("", f"{path}: not valid TOML: nested too deeply") from None
    return from_dict(data)
