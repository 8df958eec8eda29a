"""A TCP proxy in front of a real broker that cuts a client's connection when the client sends a marker: how a
broker that refuses a topic by dropping its publisher (Mosquitto does, for topics it rejects) looks to the client,
for a topic the daemon's own checks let through. With ``hold``, the connection stays open instead and nothing the
client sends from the marker on reaches the broker (a publish under way, its PUBACK never coming), until the
broker goes away; that happens once, later connections are passed through."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, target_port: int, marker: bytes, *, hold: bool = False) -> None:
        self.target_port = target_port
        self.marker = marker
        self.hold = hold
        self.cuts = 0
        self.held = threading.Event()
        """Set once the marker was held back (``hold``)."""
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = int(self._server.getsockname()[1])
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._start(self._accept)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the broker is away: so is this connection
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        holding = False
        try:
            while data := src.recv(65536):
                if from_client and not (self.hold and self.held.is_set()) and self.marker in data:
                    self.cuts += 1  # the packet is not forwarded: the broker never sees it
                    if not self.hold:
                        break
                    holding = True
                    self.held.set()
                if not holding:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stopping.set()
        self._server.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
