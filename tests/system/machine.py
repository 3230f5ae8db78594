"""A Debian 12 machine booted with systemd-nspawn, for the system tests.

The base tree (systemd, dbus and zddd's runtime dependencies, made with mmdebstrap from the
host's own Debian apt sources) is cached outside the checkout, keyed by its package list and
sources, and copied for every boot so the cache stays clean. The container gets a private
network namespace (only `lo`), so its nftables and its traffic never touch the host's.
Commands run inside with nsenter into the container's leader (PID 1 of the container).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SUITE = "bookworm"
# zddd's Depends (first alternatives), what the package's maintainer scripts need, and the tools
# an operator uses in the checks (curl, nft, busctl come with these).
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-nftables", "python3-pyroute2",
    "python3-dbus-fast", "python3-sdnotify", "python3-prometheus-client", "nftables", "curl",
    "iproute2", "passwd", "procps",
)
CACHE_DIR = Path(os.environ.get("ZDDD_TEST_CACHE", "/var/cache/zddd-test"))
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container"}


def ensure_tools() -> None:
    """Install mmdebstrap and systemd-nspawn from Debian when missing (like `make setup`, the
    tests bring what they need: CI runs on a fresh machine)."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=HOST_PATH) is None]
    if missing:
        env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env, timeout=600)


def host_debian_sources() -> list[str]:
    """The host's enabled apt source files that point at Debian's archive (not third-party
    repositories, which the container neither needs nor may reach)."""
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")
                                               + glob.glob("/etc/apt/sources.list.d/*.sources"))
    found = []
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        live = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if any("debian" in line for line in live):
            found.append(name)
    if not found:
        raise RuntimeError("no Debian apt source found on the host to build the container from")
    return found


def base_tree(extra: tuple[str, ...] = (), flavor: str = "base") -> Path:
    """The cached base tree, made with mmdebstrap when absent (about 25 s, 280 MB). `extra`
    packages make a tree of another `flavor` (cached beside the base one, not replacing it)."""
    sources = host_debian_sources()
    packages = (*PACKAGES, *extra)
    key = hashlib.sha256("\n".join(
        [SUITE, *packages] + [Path(s).read_text() for s in sources]).encode()).hexdigest()[:12]
    base = CACHE_DIR / f"{SUITE}-{flavor}-{key}"
    if (base / "etc/os-release").exists():
        return base
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{base.name}.partial-", dir=CACHE_DIR))
    try:
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages),
             # Snapshot mirrors serve Release files whose Valid-Until has passed.
             '--aptopt=Acquire::Check-Valid-Until "false"', SUITE, str(partial / "root"),
             *sources],
            check=True, capture_output=True, text=True, timeout=600,
            env={"PATH": HOST_PATH, "LANG": "C.UTF-8"})
        try:
            os.rename(partial / "root", base)  # another run may have made it meanwhile
        except OSError:
            if not (base / "etc/os-release").exists():
                raise
        # Trees made for an older package list or other sources are not used again.
        for old in CACHE_DIR.glob(f"{SUITE}-{flavor}-*"):
            if old != base and ".partial-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"mmdebstrap failed:\n{e.stderr[-4000:]}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return base


def host_apt(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the host's apt-get on the (not booted) tree at `root`: its sources, lists, status
    and archive cache. The container has no network; this fills what apt inside needs."""
    conf = root.parent / "apt-host.conf"
    # The sandbox user is the host's _apt, whose uid may differ from the tree's.
    conf.write_text(f'Dir "{root}/";\nAPT::Sandbox::User "root";\n')
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "APT_CONFIG": str(conf)})


class Result(subprocess.CompletedProcess):
    @property
    def out(self) -> str:
        return self.stdout.strip()


class Machine:
    """A copy of the base tree under `workdir`, booted (and rebooted) with systemd-nspawn."""

    def __init__(self, base: Path, workdir: Path):
        self.workdir = workdir
        self.root = workdir / "root"
        self.name = f"zddd-test-{uuid.uuid4().hex[:8]}"
        self.console_log = workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0
        self.base = base
        self.bpffs = workdir / "bpffs"
        # More systemd-nspawn options (capabilities, binds), for machines that need them.
        self.nspawn_args: list[str] = []

    @classmethod
    def fresh(cls, prefix: str, extra: tuple[str, ...] = (), flavor: str = "base") -> "Machine":
        """A machine over the cached base tree (made, with its tools, when missing), in a new
        work directory under /var/tmp; `create` and `boot` are the caller's. `extra` packages
        come from a tree of their own `flavor` (see `base_tree`)."""
        ensure_tools()
        return cls(base_tree(extra, flavor),
                   Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")))

    def create(self) -> None:
        """Copy the base tree (the cache stays clean). `destroy` undoes this, even half done."""
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.root)], check=True)
        # A bpffs instance of the container's own, bound at /sys/fs/bpf as a systemd host has it
        # (nspawn's /sys/fs is read-only and has none): the BPF drop-in relies on it.
        self.bpffs.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True)

    # ---- lifecycle ----

    def boot(self, timeout: float = 60) -> None:
        log = open(self.console_log, "ab")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--private-network",
             "--console=passive", f"--machine={self.name}", f"--bind={self.bpffs}:/sys/fs/bpf",
             *self.nspawn_args, "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": HOST_PATH, "LANG": "C.UTF-8"})
        log.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console_log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("the container's init did not start")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            self.leader = int(pids[0]) if pids else 0
            time.sleep(0.1)
        # "degraded" is a finished boot too: a failed unit is what some tests look for.
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"boot did not finish (state {state!r}): "
                                   f"{self.sh('systemctl list-jobs --no-pager').stdout}")
            state = self.sh("systemctl is-system-running", timeout=10).out
            time.sleep(0.2)

    def poweroff(self, timeout: float = 30) -> None:
        """Stop the container: SIGTERM to nspawn (a clean poweroff), then SIGKILL to its init
        (which ends every process of the container) and to nspawn."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in (self.leader, self.nspawn.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.nspawn.wait(10)
        self.nspawn = None
        self.leader = 0

    def destroy_after_journal(self, *units: str) -> None:
        """Print the journal of `units` into the test's output (for a failure's report), then
        destroy the container whatever happens."""
        try:
            if self.leader:
                args = " ".join(f"-u '{unit}'" for unit in units)
                print("--- journal ---\n" + self.sh(f"journalctl {args} --no-pager "
                                                   "-o short-monotonic").stdout, file=sys.stderr)
        finally:
            self.destroy()

    def destroy(self) -> None:
        self.poweroff()
        # Mounts nspawn may have left under the tree (it cleans up on a normal exit).
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(str(self.workdir))),
                            key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- commands inside ----

    def sh(self, script: str, *, user: str | None = None, timeout: float = 60,
           check: bool = False) -> Result:
        """Run a shell script inside the container (as root, or as `user` with a login-like
        environment), with a clean environment. Returns stdout/stderr; check=True raises."""
        if not self.leader:
            raise RuntimeError("the container is not running")
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={CONTAINER_PATH}",
               "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]
        if user:
            cmd += ["runuser", "-u", user, "--"]
        cmd += ["sh", "-c", script]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        result = Result(p.args, p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"in the container: {script!r} exited {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return result

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the container's tree (works booted or not)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def wait(self, script: str, timeout: float, what: str, interval: float = 0.2) -> Result:
        """Run `script` until it exits 0; AssertionError naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.sh(script, timeout=max(5.0, timeout))
            if r.returncode == 0:
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: "
                                     f"{r.stdout}{r.stderr}")
            time.sleep(interval)
