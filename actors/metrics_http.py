"""A minimal HTTP/1.x server over non-blocking sockets in an actor's Reactor: enough for Prometheus
to GET /metrics. It never blocks: requests are read and answers written as the epoll says the
sockets are ready, so an actor serving it stays free for its messages (a scraper that stops
reading holds one socket, nothing else)."""

from actorbroker.transport.lanes import IN, OUT

MAX_REQUEST = 16 * 1024     # headers of a scrape are a few hundred bytes
MAX_CLIENTS = 64            # beyond, the oldest connection is dropped


class HttpServer:
    """Accepts on `sock`; `render(path)` gives (status line, content type, body bytes)."""

    def __init__(self, reactor, sock, render):
        self.reactor, self.sock, self.render = reactor, sock, render
        self.clients = {}       # fd -> _HttpClient, oldest first
        sock.setblocking(False)
        reactor.add(sock.fileno(), self, IN)

    def on_event(self, fd, events):
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.clients) >= MAX_CLIENTS:
                self.clients[next(iter(self.clients))].close()
            client = _HttpClient(self, conn)
            self.clients[client.fd] = client
            self.reactor.add(client.fd, client, IN)

    def close(self):
        for client in list(self.clients.values()):
            client.close()
        self.reactor.remove(self.sock.fileno())
        self.sock.close()


class _HttpClient:
    __slots__ = ("server", "sock", "fd", "request", "response")

    def __init__(self, server, sock):
        sock.setblocking(False)
        self.server, self.sock, self.fd = server, sock, sock.fileno()
        self.request = b""
        self.response = None

    def on_event(self, fd, events):
        if self.response is None:
            self._read()
        if self.response is not None:
            self._write()

    def _read(self):
        try:
            data = self.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.request += data
        if b"\r\n\r\n" not in self.request and b"\n\n" not in self.request:
            if len(self.request) > MAX_REQUEST:
                self.close()
            return
        parts = self.request.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        else:
            status, ctype, body = self.server.render(parts[1].decode("latin-1").split("?", 1)[0])
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        self.response = bytearray(head + (body if parts[:1] != [b"HEAD"] else b""))
        self.server.reactor.set_mask(self.fd, OUT)

    def _write(self):
        try:
            sent = self.sock.send(self.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.response[:sent]
        if not self.response:
            self.close()

    def close(self):
        if self.server.clients.pop(self.fd, None) is not None:
            self.server.reactor.remove(self.fd)
            try:
                self.sock.close()
            except OSError:
                pass
