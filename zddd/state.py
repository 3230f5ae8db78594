"""The saved desired state: written atomically before the kernel changes, read at start."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ALL_TARGETS, TARGET_NAMES


@dataclass(frozen=True)
class SavedState:
    """`target` is the desired target; `draining` names the target being drained towards off
    (then `target` is "off") and `drain_deadline` is its wall-clock end (seconds since epoch);
    `drain_answered` is true once the agent has told HAProxy "drain" during that drain."""

    target: str
    draining: str = ""
    drain_deadline: float = 0.0
    drain_answered: bool = False


class StateFile:
    def __init__(self, path: str):
        self.path = Path(path)

    def load(self) -> SavedState | None:
        """The saved state, or None when there is none or it cannot be trusted."""
        try:
            data = json.loads(self.path.read_text())
            state = SavedState(
                target=str(data["target"]),
                draining=str(data.get("draining", "")),
                drain_deadline=float(data.get("drain_deadline", 0.0)),
                drain_answered=bool(data.get("drain_answered", False)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if state.target not in ALL_TARGETS or state.draining not in ("",) + TARGET_NAMES:
            return None
        return state

    def save(self, state: SavedState) -> None:
        """Replace the file atomically: a crash leaves either the old or the new state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(state), f)
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
