"""Slow clients: connections that never finish their request headers (a slowloris), the load
that tests/system/test_slow_clients.py holds the API under and bench/bench_viewer_tiles.py
times the viewer's tiles beside."""

from __future__ import annotations

import socket
import threading


class SlowClients:
    """Connections that send a request line, then one header line every `interval` s."""

    def __init__(self, address: str, count: int, interval: float = 2.0):
        host, port = address.rsplit(":", 1)
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
            self.sockets.append(sock)
        self.interval, self.stop = interval, threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        n = 0
        while not self.stop.wait(self.interval):
            n += 1
            for sock in self.sockets:
                try:
                    sock.sendall(f"X-Slow-{n}: {n}\r\n".encode())
                except OSError:  # the server gave up on this one: as it should
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()
