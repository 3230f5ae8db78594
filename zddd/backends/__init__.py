"""The data-plane backends, all behind one small interface.

A backend knows how to express "steer new connections on the listen port to port P" in the
kernel. The core drives it in four steps:

- `probe`: can this machine run it? (BackendUnavailable says why and what to do instead)
- `read`: what does the kernel hold now, judged against what zddd wants? (`KernelState`)
- `plan`: plain data for the change, made from what `read` returned and `desired` alone (no
  second look at the kernel: where `read` found nothing, a step says "where the interfaces are
  when this runs" rather than the plan listing them)
- `apply`: first the *layout* steps (create, load, pin, attach: idempotent, possibly many),
  then the *flip*: the one atomic change of where new connections go (a map element). A plan
  whose layout is intact is a flip alone. `apply` reports what it did (ApplyError if it did not
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


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold: the listen port, the target ports by name, the target new
    connections go to (None for off), and where and how the BPF backends build it."""

    listen_port: int
    ports: tuple[tuple[str, int], ...]
    active: str | None
    interfaces: tuple[str, ...] | None = None  # None: every interface up (resolved at read)
    pin_dir: str = "/sys/fs/bpf/zddd"
    flow_entries: int = 1048576
    xdp_mode: str = "native"

    @classmethod
    def from_config(cls, config: Config, active: str | None) -> "Desired":
        ports = tuple(sorted((t.name, t.port) for t in config.targets.values()))
        return cls(config.listen_port, ports, active, config.interfaces, config.bpf_pin_dir,
                   config.bpf_flow_entries, config.xdp_mode)

    def steering(self, active: str | None) -> "Desired":
        return replace(self, active=active)

    def port_of(self, target: str) -> int:
        return dict(self.ports)[target]


@dataclass(frozen=True)
class KernelState:
    """What `read` found. `active` is the target new connections are steered to (None: off);
    `intact` is False when zddd's objects are present but not all exactly as zddd would build
    them for the desired layout (`problems` says what differs, for the log); `found` is the
    backend's own record of what it read, from which `plan` works."""

    active: str | None
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

    def target_problem(self, target: str) -> str | None:
        """Why the data plane cannot steer new connections to `target` now even if its vhost
        answers (sk_lookup: its listener could not be taken), as of the last `read`; None when
        it can. The health gate counts such a target as down."""
        return None

    def flow_attribution(self) -> Callable[[list[Flow]], list[str | None]] | None:
        """For backends whose steered connections keep the listen port as their local port
        (sk_lookup): a function saying which target each such connection belongs to (a target
        name or None), for connection counts. None: connections are counted by port alone."""
        return None

    def flows_steered(self) -> dict[str, int]:
        """New connections steered so far, by target name, where the backend can count them
        (through what the last `read` opened)."""
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
