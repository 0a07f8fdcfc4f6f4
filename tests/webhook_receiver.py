"""A real HTTP webhook receiver for the tests, run as its own process:

    python tests/webhook_receiver.py PORT LOG_FILE

Every request is appended to LOG_FILE as one JSON line (path, headers, body, time). The path
chooses the answer: ``/ok/...`` 200; ``/fail/N/...`` 500 for the first N requests to that
path, then 200; ``/always500/...`` 500; ``/hang/...`` reads the request and never answers
(until the process ends); ``/trickle/S/...`` sends ``HTTP/1.1 200 OK`` and then one header
byte every S seconds, forever (a slow-loris answer: each byte within a socket timeout).
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
SEEN: Counter = Counter()


class Handler(BaseHTTPRequestHandler):
    log_file = ""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with LOCK:
            SEEN[self.path] += 1
            count = SEEN[self.path]
            record = {
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": base64.b64encode(body).decode(),
                "time": time.time(),
            }
            with open(self.log_file, "a") as log:
                log.write(json.dumps(record) + "\n")
        parts = self.path.strip("/").split("/")
        if parts[0] == "hang":
            time.sleep(3600)
            return
        if parts[0] == "trickle":
            self._trickle(float(parts[1]))
            return
        status = 200
        if parts[0] == "always500" or (parts[0] == "fail" and count <= int(parts[1])):
            status = 500
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, interval: float) -> None:
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            while True:
                self.wfile.flush()
                time.sleep(interval)
                self.wfile.write(b"X")
        except OSError:  # the sender gave up and closed the connection
            self.close_connection = True

    def log_message(self, *args):
        pass


def main() -> None:
    port, log_file = int(sys.argv[1]), sys.argv[2]
    Handler.log_file = log_file
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
