"""The lab's ground floor: paths, the one error type, polling, and processes we start and stop
(`Proc`).

`LabError` subclasses AssertionError, so a lab that cannot be built or a wait that times out
shows up in pytest as a test failure, while the demo and the bench catch it (`run_main`) to print
a one-line reason and exit 2. `wait_for` is the only polling loop of the lab.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
VENV_BIN = REPO / ".venv" / "bin"
# Debian's interpreter: the only one where bcc and libnftables import. Small helper scripts run
# inside namespaces use it; anything that imports zddd or zdddlab uses VENV_BIN / "python".
PYTHON = "/usr/bin/python3"


class LabError(AssertionError):
    """The lab could not be built or did not reach a state in time (the message says which)."""


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with output captured as text; a failure is a LabError carrying stderr."""
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    argv = [str(a) for a in argv]
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as e:
        raise LabError(f"{' '.join(argv)} failed: {(e.stderr or '').strip()}") from None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns a true value (which is returned); LabError naming
    `what` once `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Proc(subprocess.Popen):
    """A process the lab started: a subprocess.Popen with a `name` for messages and, when the
    lab keeps its output in a file, that `log`. Every helper process of the lab is one, so
    there is one way to end each: `close` (SIGKILL if it still runs, reaped within 5 s) for
    helpers that need no clean exit, `stop` (SIGTERM first) for one started in a session of
    its own (`Lab.spawn`) that deserves one."""

    def __init__(self, argv: list, *, name: str | None = None, log: Path | None = None, **kw):
        super().__init__(argv, **kw)
        self.name = name or str(argv[0])
        self.log = log

    def alive(self) -> bool:
        return self.poll() is None

    def log_text(self) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise LabError(f"{self.name} exited with {self.returncode}:\n"
                           f"{self.log_text()[-2000:]}")

    def close(self, timeout: float = 5.0) -> None:
        """SIGKILL it if it still runs, and reap it (TimeoutExpired if it is not gone after
        `timeout` s)."""
        if self.poll() is None:
            self.kill()
            self.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM its process group (its session's: see Lab.spawn), then SIGKILL the group if
        it lingers."""
        if self.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait()


# Set once Ctrl-C was pressed. A terminal's Ctrl-C also reaches the lab's daemons that share our
# process group, so a failure seen just after it is a consequence, not the story to tell.
interrupted = threading.Event()


def interrupt(signum, frame):
    interrupted.set()
    raise KeyboardInterrupt


def exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def run_main(main, name: str) -> None:
    """Run a demo or bench `main` and exit with its status: 2 when the lab could not be built,
    130 when interrupted (everything removed either way)."""
    try:
        sys.exit(main())
    except (LabError, subprocess.TimeoutExpired) as e:
        if interrupted.is_set():
            print(f"\n{name}: interrupted; namespaces and processes removed", file=sys.stderr)
            sys.exit(130)
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; namespaces and processes removed", file=sys.stderr)
        sys.exit(130)
