"""A loopback TCP proxy that limits the bandwidth from the server to the client (a slow link).

``python bench/throttle.py UPSTREAM_HOST:PORT MB_PER_S`` listens on a free loopback port, prints
it on the first line of stdout and forwards every connection to the upstream: requests pass
untouched, responses at most ``MB_PER_S`` megabytes per second per connection (paced in 64 KiB
slices). Run in its own process so its threads do not share the client's GIL.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

SLICE = 64 * 1024


def _pipe(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
    start = time.monotonic()
    sent = 0
    try:
        while data := src.recv(SLICE):
            if rate and sent / rate < time.monotonic() - start - 0.05:
                start, sent = time.monotonic(), 0  # the link was idle: no credit for that
            dst.sendall(data)
            if rate:
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(client: socket.socket, upstream: tuple[str, int], rate: float) -> None:
    server = socket.create_connection(upstream)
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_pipe, args=(client, server, None), daemon=True).start()
    _pipe(server, client, rate)
    client.close()
    server.close()


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    rate = float(sys.argv[2]) * 1e6
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client, (host, int(port)), rate), daemon=True).start()


if __name__ == "__main__":
    main()
