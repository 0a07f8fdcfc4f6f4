"""The tile process of a gevent API worker: renders viewer image tiles with native threads.

Started by ``api.tile_server`` on a worker's first tile request under gevent, with one socket
per render thread; each thread answers one request at a time on its socket. It ends when the
worker closes the sockets (or dies): every thread then reads end-of-file. Plain Python with
no gevent, so zarr's and s3fs's own threads and locks work as they do in the Celery worker.

    python -m api.tile_process <open inputs> <fd> [<fd> ...]
"""

from __future__ import annotations

import socket
import sys
import threading

from api.tile_server import TileRenderer, receive_message, send_message
from shared.exceptions import InputError

METHODS = ("render", "forget")


def answer(renderer: TileRenderer, request: tuple) -> tuple[str, object]:
    """("ok", value), ("input_error", (code, message)) or ("error", text)."""
    try:
        if request[0] not in METHODS:
            raise ValueError(f"unknown request {request[0]!r}")
        return "ok", getattr(renderer, request[0])(*request[1:])
    except InputError as exc:
        return "input_error", (exc.code, exc.message)
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"[:300]


def serve(sock: socket.socket, renderer: TileRenderer) -> None:
    sock.setblocking(True)  # made under gevent, the socket arrives non-blocking
    with sock:
        while True:
            try:
                request = receive_message(sock)
            except EOFError:
                return  # the API worker closed its end, or died
            except OSError as exc:
                print(f"tile process: connection lost: {exc}", file=sys.stderr)
                return
            send_message(sock, answer(renderer, request))


def main(argv: list[str]) -> int:
    renderer = TileRenderer(int(argv[0]))
    threads = [
        threading.Thread(target=serve, args=(socket.socket(fileno=int(fd)), renderer), daemon=True) for fd in argv[1:]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
