"""The saved desired state: written atomically before the kernel changes, read at start.

A state file that is missing is normal (first start). One that exists but cannot be read or
trusted (corrupt, truncated, not a file, unknown target) is ignored with one warning line in the
log: at start the kernel's state then wins when zddd's data plane is there, else `initial`. A save
that fails raises OSError and leaves the previous file as it was; no temporary file stays behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .api import MAX_SECONDS
from .config import ALL_TARGETS, DEFAULT_SERVICE, SPLIT, TARGET_NAMES
from .logfmt import quote

log = logging.getLogger("zddd")
# A real state file is under 300 bytes a service (at most 256 services); anything far bigger is
# not one (and is not read whole).
MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SavedState:
    """`target` is the desired target; `draining` names the target being drained towards off
    (then `target` is "off") and `drain_deadline` is its wall-clock end (seconds since epoch);
    `drain_answered` is true once the agent has told HAProxy "drain" during that drain, and
    `drain_caller` who asked for it. `last_switch_timestamp` (µs since the epoch, 0: never) and
    `last_switch_caller` are the last switch's, so a restart still shows them. Files written
    before a field existed read as its default."""

    target: str
    draining: str = ""
    drain_deadline: float = 0.0
    drain_answered: bool = False
    drain_caller: str = ""
    last_switch_timestamp: int = 0
    last_switch_caller: str = ""
    # target "split": main's weight (1-99). A ramp in progress: main's weight from and to, its
    # wall-clock start and its length in seconds (ramp_to -1: none).
    weight: int = -1
    ramp_from: int = -1
    ramp_to: int = -1
    ramp_start: float = 0.0
    ramp_seconds: float = 0.0


class StateFile:
    def __init__(self, path: str):
        self.path = Path(path)

    def load(self) -> dict[str, SavedState] | None:
        """The saved state of every service by name, or None when there is none or it cannot
        be trusted (then with a warning in the log)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._untrusted(e.strerror or str(e))
            return None
        if len(raw) > MAX_BYTES:
            self._untrusted(f"larger than {MAX_BYTES} bytes")
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
            if isinstance(data, dict) and "services" in data:
                services = data["services"]
                if not isinstance(services, dict) or len(data) != 1:
                    raise TypeError("services")
                states = {name: _state(one) for name, one in services.items()}
            else:
                states = {DEFAULT_SERVICE: _state(data)}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            self._untrusted(f"not a state file ({type(e).__name__})")
            return None
        for name, state in states.items():
            if not isinstance(name, str) or not _valid(state):
                self._untrusted("its content is not a valid state")
                return None
        return states

    def _untrusted(self, why: str) -> None:
        log.warning("event=state_file_ignored path=%s reason=%s", quote(str(self.path)),
                    quote(why))
        return None

    def save(self, states: dict[str, SavedState] | SavedState) -> None:
        """Replace the file atomically: a crash leaves either the old or the new state. Service
        "default" alone (or one SavedState) is written in the single-service format, which an
        older zddd reads."""
        if isinstance(states, SavedState):
            states = {DEFAULT_SERVICE: states}
        if set(states) == {DEFAULT_SERVICE}:
            data: dict = _record(states[DEFAULT_SERVICE])
        else:
            data = {"services": {name: _record(state) for name, state in sorted(states.items())}}
        _make_dirs(self.path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        # The rename itself must reach the disk too, or a power cut could bring back the old file.
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


# Fields written only when they say something (no split, no ramp: the file as before them).
_OPTIONAL = {"weight": -1, "ramp_from": -1, "ramp_to": -1, "ramp_start": 0.0, "ramp_seconds": 0.0}


def _record(state: SavedState) -> dict:
    return {k: v for k, v in asdict(state).items() if _OPTIONAL.get(k, object()) != v}


def _state(data: dict) -> SavedState:
    return SavedState(
        target=data["target"],
        draining=data.get("draining", ""),
        drain_deadline=float(data.get("drain_deadline", 0.0)),
        drain_answered=data.get("drain_answered", False),
        drain_caller=data.get("drain_caller", ""),
        last_switch_timestamp=data.get("last_switch_timestamp", 0),
        last_switch_caller=data.get("last_switch_caller", ""),
        weight=data.get("weight", -1),
        ramp_from=data.get("ramp_from", -1),
        ramp_to=data.get("ramp_to", -1),
        ramp_start=float(data.get("ramp_start", 0.0)),
        ramp_seconds=float(data.get("ramp_seconds", 0.0)),
    )


def _weight(value: object, allowed: range) -> bool:
    return type(value) is int and value in allowed


def _valid(state: SavedState) -> bool:
    split = state.target == SPLIT
    if not _weight(state.weight, range(1, 100) if split else range(-1, 0)):
        return False
    if state.ramp_to != -1 and not (_weight(state.ramp_to, range(0, 101))
                                    and _weight(state.ramp_from, range(0, 101))
                                    and math.isfinite(state.ramp_start)
                                    and 0 < state.ramp_seconds <= MAX_SECONDS):
        return False
    return not ((state.target not in ALL_TARGETS and not split)
                or state.draining not in ("", SPLIT) + TARGET_NAMES
                or not isinstance(state.drain_answered, bool)
                or not isinstance(state.drain_caller, str)
                or not isinstance(state.last_switch_caller, str)
                or type(state.last_switch_timestamp) is not int
                or not 0 <= state.last_switch_timestamp < 1 << 64
                or (bool(state.draining) and state.target != "off")
                or not math.isfinite(state.drain_deadline))


def _make_dirs(directory: Path) -> None:
    """mkdir -p with mode 0755 for every directory it creates (Path.mkdir gives the parents
    0777 minus the umask): never group- or world-writable, whatever the umask, because whoever
    can write there decides where traffic goes after the next restart."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
