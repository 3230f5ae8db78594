"""zddd — the zero-downtime deployment daemon."""

__version__ = "0.2.0"
