#!/usr/bin/python3
"""Print one HAProxy server's state as its stats socket reports it (`show stat`).

    haproxy_server_state.py SOCKET BACKEND SERVER

Prints the server's status column (UP, DOWN, DRAIN, MAINT, "UP 1/2", ...) and its check and
agent results, as JSON on one line; exits 1 with a message if the socket cannot be read or
has no such server.
"""

from __future__ import annotations

import json
import socket
import sys


def show_stat(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path, backend, server = argv[1:]
    try:
        lines = show_stat(path).splitlines()
    except OSError as e:
        print(f"cannot read HAProxy's stats socket {path}: {e}", file=sys.stderr)
        return 1
    header = lines[0].lstrip("# ").split(",") if lines else []
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == backend and row.get("svname") == server:
            print(json.dumps({k: row.get(k, "") for k in
                              ("status", "check_status", "agent_status", "weight")}))
            return 0
    print(f"HAProxy has no server {server} in backend {backend}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
