"""A tiny HTTP/1.1 vhost for tests: answers every GET with its name, keeps connections alive.

    python3 tests/httpd.py PORT NAME [PATH=STATUS ...]

Listens on [::] (IPv4 too). GET /slow?s=N answers after N seconds (a connection held open on
purpose); GET /sockname answers NAME and the connection's local port as the server sees it
(e.g. "main 8888" for a connection steered without rewriting); GET /bytes?n=N answers N dots
and then NAME (a bulk transfer that still says who sent it); any other path answers NAME at
once, with status 200 unless a PATH=STATUS argument gives another for that path (e.g.
/health=404). Prints "ready" on stdout once listening.
"""

import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/slow":
            time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
        body = f"{self.server.name}\n".encode()
        if url.path == "/sockname":
            body = f"{self.server.name} {self.connection.getsockname()[1]}\n".encode()
        bulk = int(parse_qs(url.query).get("n", ["0"])[0]) if url.path == "/bytes" else 0
        self.send_response(self.server.statuses.get(url.path, 200))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(bulk + len(body)))
        self.end_headers()
        chunk = b"." * 65536
        while bulk > 0:
            self.wfile.write(chunk[:bulk])
            bulk -= len(chunk)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    port, name = int(sys.argv[1]), sys.argv[2]
    server = Server(("::", port), Handler)
    server.name = name
    server.statuses = {}
    for arg in sys.argv[3:]:
        path, _, status = arg.rpartition("=")
        server.statuses[path] = int(status)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
