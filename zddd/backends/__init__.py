"""The data-plane backends, all behind one small interface.

A backend knows how to express "steer new connections on the listen port to port P" in the
kernel. The core drives it in four steps: `probe` (can this kernel do it?), `read` (what does the
kernel hold now?), `plan` (plain data describing the change), `apply` (commit a plan atomically).
The kernel is the source of truth; a backend keeps no state about it beyond what `read` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..config import Config


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message says why and what to do."""


class ApplyError(Exception):
    """The kernel refused a plan; nothing of it took effect."""


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold: the listen port, the target ports by name, and the target
    new connections go to (None for off)."""

    listen_port: int
    ports: tuple[tuple[str, int], ...]
    active: str | None

    @classmethod
    def from_config(cls, config: Config, active: str | None) -> "Desired":
        ports = tuple(sorted((t.name, t.port) for t in config.targets.values()))
        return cls(config.listen_port, ports, active)


@dataclass(frozen=True)
class KernelState:
    """What `read` found. `active` is the target steered to (None: off); `intact` is False when
    zddd's objects are present but not exactly as zddd would have written them for `desired`."""

    active: str | None
    intact: bool


@dataclass(frozen=True)
class Plan:
    """A change as plain data. `steering_only` plans change nothing but the steering decision."""

    commands: tuple[Any, ...]
    steering_only: bool

    def __bool__(self) -> bool:
        return bool(self.commands)


class Backend(ABC):
    name: str

    @abstractmethod
    def probe(self) -> None:
        """Raise BackendUnavailable if this machine cannot run the backend."""

    @abstractmethod
    def read(self, desired: Desired) -> KernelState | None:
        """What the kernel holds, judged against `desired`'s layout; None if nothing of zddd's."""

    @abstractmethod
    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        """The smallest atomic change from `current` to `desired` (empty if they agree)."""

    @abstractmethod
    def apply(self, plan: Plan) -> None:
        """Commit the plan in one atomic step, or raise ApplyError having changed nothing."""

    def flows_steered(self) -> dict[str, int]:
        """New connections steered so far, by target name, where the backend can count them.
        May be called from another thread (the metrics scrape)."""
        return {}


def make_backend(config: Config) -> Backend:
    if config.backend == "nftables":
        from .nftables import NftablesBackend

        return NftablesBackend()
    raise BackendUnavailable(
        f"backend {config.backend!r} is not available in this version of zddd; "
        'use backend = "nftables"'
    )
