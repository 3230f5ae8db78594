"""The names of zddd's D-Bus API (SPEC), shared by the daemon's adapter and zddctl.

A module of its own, importing nothing: zddctl reads them without loading a bus library.
"""

BUS_NAME = "org.zddd.Steering1"
OBJECT_PATH = "/org/zddd/Steering1"
INTERFACE = "org.zddd.Steering1.Manager"
ERROR_PREFIX = "org.zddd.Steering1.Error."
PROPERTIES = "org.freedesktop.DBus.Properties"
