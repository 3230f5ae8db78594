"""The core as the adapters read it: services by name, and the kernel reads of all of them.

The core (zddd/core.py) steers many services (`Steering.services`, SPEC "Services"). A stand-in
core written before them (the tests' stubs, which have the one service's methods on the core
itself) is read as one service named `default`, as the single-service config form is, so an
adapter has one way to read either.
"""

from __future__ import annotations

from typing import Any

DEFAULT = "default"


class CoreView:
    def __init__(self, core: Any):
        self.core = core
        self.legacy = not hasattr(core, "services")

    def services(self) -> dict[str, Any]:
        """Name -> the service's steering (snapshot, switch, wait_drained...), sorted by name."""
        if self.legacy:
            return {DEFAULT: self.core}
        return dict(sorted(self.core.services.items()))

    def backend_name(self) -> str:
        backend = getattr(self.core, "backend", None)
        name = getattr(backend, "name", None)
        if isinstance(name, str):
            return name
        return next(iter(self.services().values())).snapshot().backend

    def connection_counts(self) -> dict[str, dict[str, int]]:
        """Service -> target -> established connections, in one kernel read (raises OSError)."""
        counts = self.core.connection_counts()
        return {DEFAULT: counts} if self.legacy else counts

    def flows_steered(self) -> dict[tuple[str, str], int]:
        """(service, target) -> new connections steered, in one kernel read."""
        flows = self.core.flows_steered()
        if self.legacy:
            return {(DEFAULT, target): n for target, n in flows.items()}
        return flows

    def flow_table(self) -> tuple[int, int] | None:
        return self.core.flow_table()
