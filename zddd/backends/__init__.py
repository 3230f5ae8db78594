"""The data-plane backends, all behind one small interface.

A backend knows how to express, for every service in one data plane, "split new connections
on the listen port between the main and backup ports by this weight" (100: all main, 0: all
backup, None: off) in the kernel. The core drives it in four steps:

- `probe`: can this machine run it? (BackendUnavailable says why and what to do instead)
- `read`: what does the kernel hold now, judged against what zddd wants? (`KernelState`)
- `plan`: plain data for the change, made from what `read` returned and `desired` alone (no
  second look at the kernel: where `read` found nothing, a step says "where the interfaces are
  when this runs" rather than the plan listing them)
- `apply`: first the *layout* steps (create, load, pin, attach: idempotent, possibly many),
  then the *flip*: per service whose weight changes, the one atomic change of where its new
  connections go (a map element, a store) and nothing of any other service's. A plan whose
  layout is intact is a flip alone. `apply` reports what it did (ApplyError if it did not
  all take); reading the result back is the caller's (the core's) next `read`.

The kernel is the source of truth. A backend keeps no judgement of the kernel between calls:
it keeps handles it opened (fds and mappings of maps a `read` found, so a flip is one store
and a metrics scrape opens nothing) and what its last `read` said for health (sk_lookup's
listener problems). Every call is made on the daemon's event loop, one at a time.
`leftover` and `remove` let zddd find and take out a data plane that another backend left
(`zddd --remove-data-plane`), so two data planes never steer at once.

Modules: nftables.py; tc.py and xdp.py over rewrite.py (bpf/steer.c); sk_lookup.py
(bpf/sk_lookup.c); pinned.py, what every BPF backend does with its pins. The kernel interfaces
they call are zddd/kernel/ (bpf(2), bpffs, pidfd, rtnetlink).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from ..config import Config

if TYPE_CHECKING:
    from ..kernel.sock_diag import Flow


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message says why and what to do."""


class ApplyError(Exception):
    """The kernel refused a plan. `changed` is False when nothing of it took effect (the old
    state stands), True when layout steps may have been half done (the core re-reads and
    repairs; the flip itself is never half done)."""

    def __init__(self, message: str, *, changed: bool = False):
        super().__init__(message)
        self.changed = changed


class NewerLayout(ApplyError):
    """The kernel holds a data plane in the layout of a newer zddd. This zddd never touches
    it (mistaking it for damage would rebuild it and break its flows), and no restart of this
    zddd helps: the message names the way out."""

    @classmethod
    def check(cls, what: str, version: int, ours: int) -> None:
        """Raise if `what` has a layout `version` newer than this zddd's `ours`."""
        if version > ours:
            raise cls(f"{what} has layout v{version}, written by a newer zddd; this one writes "
                      f"v{ours} and leaves it alone: install the newer zddd again, or drain "
                      "this host with it (zddctl switch off --wait-drained), stop it and run "
                      "`zddd --remove-data-plane`")


MAIN, BACKUP = "main", "backup"


@dataclass(frozen=True)
class ServiceLayout:
    """One steered service as the kernel should hold it: its name, its listen port, its target
    ports by name (sorted by name: ("backup", 80), ("main", 8080)) and `weight`, the percent of
    new connections that go to main (the rest go to backup); None is off (nothing steered: new
    connections to the listen port are refused). 100 is today's "main", 0 today's "backup".
    Listen and target ports are distinct across all services of a Desired."""

    name: str
    listen_port: int
    ports: tuple[tuple[str, int], ...]
    weight: int | None

    @property
    def active(self) -> str | None:
        """The target new connections go to: "main", "backup", "split" or None (off)."""
        return weight_target(self.weight)

    def port_of(self, target: str) -> int:
        return dict(self.ports)[target]


def weight_target(weight: int | None) -> str | None:
    """The target name a main weight stands for (None: off; "split" between 1 and 99)."""
    if weight is None:
        return None
    return MAIN if weight >= 100 else BACKUP if weight <= 0 else "split"


def target_weight(target: str | None) -> int | None:
    """The main weight a target name stands for (None or "off": None)."""
    return {MAIN: 100, BACKUP: 0}.get(target or "")


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold: every service (sorted by listen port), and where and how
    the BPF backends build it. One data plane holds them all; a change of one service's
    weight is one element (nftables) or one store (BPF) and touches no other service."""

    services: tuple[ServiceLayout, ...]
    interfaces: tuple[str, ...] | None = None  # None: every interface up (resolved at read)
    pin_dir: str = "/sys/fs/bpf/zddd"
    flow_entries: int = 1048576
    xdp_mode: str = "native"

    @classmethod
    def from_config(cls, config: Config, weights: dict[str, int | None]) -> "Desired":
        """`weights`: service name -> main weight (None: off); a service not named is off."""
        services = tuple(sorted(
            (ServiceLayout(s.name, s.listen_port,
                           tuple(sorted((t.name, t.port) for t in s.targets.values())),
                           weights.get(s.name))
             for s in config.services.values()), key=lambda s: s.listen_port))
        return cls(services, config.interfaces, config.bpf_pin_dir, config.bpf_flow_entries,
                   config.xdp_mode)

    def with_weight(self, name: str, weight: int | None) -> "Desired":
        return replace(self, services=tuple(replace(s, weight=weight) if s.name == name else s
                                            for s in self.services))

    def service(self, name: str) -> ServiceLayout:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def by_listen_port(self) -> dict[int, ServiceLayout]:
        return {s.listen_port: s for s in self.services}

    def by_target_port(self) -> dict[int, tuple[ServiceLayout, str]]:
        """target port -> (its service, the target's name)."""
        return {port: (s, name) for s in self.services for name, port in s.ports}


# A problem that starts with one of these says the kernel holds an older zddd's layout: its
# rebuild is an upgrade, not damage (the core logs it at info, not as a warning).
OLDER_LAYOUT = ("older layout", "layout version", "layout v1")


@dataclass(frozen=True)
class KernelState:
    """What `read` found. `weights` has, for each service of the desired layout that the
    kernel steers or holds (by listen port), its main weight (None: off); a desired service
    the kernel has nothing of is absent. `intact` is False when zddd's objects are present but
    not all exactly as zddd would build them for the desired layout, including a service the
    kernel lacks or one it has that is not desired (`problems` says what differs, for the log);
    `found` is the backend's own record of what it read, from which `plan` works."""

    weights: dict[str, int | None]
    intact: bool
    found: Any = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A change as plain data: `layout` steps (empty when the layout is intact), then `flip`
    (None when the steering decision already matches)."""

    layout: tuple[Any, ...] = ()
    flip: Any = None

    def __bool__(self) -> bool:
        return bool(self.layout) or self.flip is not None

    @property
    def steering_only(self) -> bool:
        return not self.layout


class Backend(ABC):
    name: str

    @abstractmethod
    def probe(self) -> None:
        """Raise BackendUnavailable if this machine cannot run the backend. Touches nothing in
        the kernel (a BPF backend compiles its programs here)."""

    @abstractmethod
    def read(self, desired: Desired) -> KernelState | None:
        """What the kernel holds, judged against `desired`'s layout; None if nothing of zddd's.
        Raises ApplyError if the kernel cannot be read, BackendUnavailable if what `desired`
        names may not be used by this zddd (a BPF pin dir of another network namespace)."""

    @abstractmethod
    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        """The change from `current` (as read) to `desired`; empty if they agree."""

    @abstractmethod
    def apply(self, plan: Plan) -> None:
        """Carry out the plan: layout steps, then the flip. Raises ApplyError (see `changed`)."""

    @abstractmethod
    def leftover(self, desired: Desired) -> str | None:
        """A one-line description of what this backend has of zddd's in the kernel (e.g.
        "table inet zddd steering main"), or None. Needs no probe: zddd asks every backend at
        start, including ones this machine cannot run."""

    @abstractmethod
    def remove(self, desired: Desired) -> None:
        """Take every object of this backend's out of the kernel (connections it steers
        break). Needs no probe."""

    def target_problem(self, service: str, target: str) -> str | None:
        """Why the data plane cannot steer new connections of `service` to `target` now even
        if its vhost answers (sk_lookup: its listener could not be taken), as of the last
        `read`; None when it can. The health gate counts such a target as down."""
        return None

    def flow_attribution(self) -> Callable[[list[Flow]], list[tuple[str, str] | None]] | None:
        """For backends whose steered connections keep the listen port as their local port
        (sk_lookup): a function saying which (service, target) each such connection belongs
        to (None: none), for connection counts. None: connections are counted by port alone."""
        return None

    def flows_steered(self) -> dict[tuple[str, str], int]:
        """New connections steered so far, by (service, target name), where the backend can
        count them (through what the last `read` opened), all services in one pass."""
        return {}

    def flow_table(self) -> tuple[int, int] | None:
        """(entries in use, capacity) of a flow map, for backends that keep one."""
        return None


def backend_class(name: str) -> type[Backend]:
    if name == "nftables":
        from .nftables import NftablesBackend

        return NftablesBackend
    if name == "tc":
        from .tc import TcBackend

        return TcBackend
    if name == "xdp":
        from .xdp import XdpBackend

        return XdpBackend
    if name == "sk_lookup":
        from .sk_lookup import SkLookupBackend

        return SkLookupBackend
    raise BackendUnavailable(
        f"backend {name!r} is not available in this version of zddd; use backend = \"nftables\"")


def make_backend(config: Config) -> Backend:
    return backend_class(config.backend)()
