"""The floor for relaying a stream with gevent: a TCP forwarder on gevent's hub that does
nothing but move bytes between a client and the backend, a greenlet per direction, as the
gateway's worker reads and writes its sockets. bench/run.py measures the (c) CPU figures
through it beside bench/floor_proxy.c (the same job in C), so the gateway's per-chunk cost can
be read against what gevent itself costs to wake up, receive a chunk and send it on.

    .venv/bin/python bench/floor_gevent.py LISTEN_PORT BACKEND_PORT
    (both on 127.0.0.1; prints "listening")
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402  (after patching, as in the gateway's worker)
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HOST = "127.0.0.1"


def pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side ends, then close both (which ends the other direction too)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()


def forwarder(backend_port: int):
    def handle(client: socket.socket, _address) -> None:
        try:
            upstream = socket.create_connection((HOST, backend_port))
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = gevent.spawn(pipe, upstream, client)
        pipe(client, upstream)
        back.join()

    return handle


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    server = StreamServer((HOST, listen_port), forwarder(backend_port))
    server.start()
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
