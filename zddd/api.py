"""The names of zddd's D-Bus API (SPEC), shared by the daemon's adapter and zddctl.

A module of its own, importing nothing: zddctl reads them without loading a bus library.
"""

BUS_NAME = "org.zddd.Steering1"
OBJECT_PATH = "/org/zddd/Steering1"
INTERFACE = "org.zddd.Steering1.Manager"
ERROR_PREFIX = "org.zddd.Steering1.Error."
PROPERTIES = "org.freedesktop.DBus.Properties"
# The longest duration any key or call takes (drain_timeout, WaitDrained, drain_timeout_usec,
# zddctl's waits): the one definition of the 24 h limit, far below what asyncio's timers and
# the µs properties (uint64) can hold. Messages about it are made from it.
MAX_SECONDS = 24 * 3600
# Each service is an object of its own (SPEC "Services"); the Manager's object is their
# ObjectManager.
SERVICE_INTERFACE = "org.zddd.Steering1.Service"
SERVICE_PATH = OBJECT_PATH + "/service"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


def service_path(name: str) -> str:
    """The D-Bus object of service `name` (service names are valid path elements)."""
    return f"{SERVICE_PATH}/{name}"
