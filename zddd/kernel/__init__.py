"""Kernel interfaces zddd calls outside bcc and libnftables, one module each."""
