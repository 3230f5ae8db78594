"""Adapters around the core, one file each: D-Bus, metrics, agent-check, systemd notify."""
