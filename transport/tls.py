"""TLS over memory BIOs, sans-IO: ciphertext in, plaintext out, and back. No sockets here.

A `TlsConnection` wraps one `ssl.SSLObject` between two `ssl.MemoryBIO`s. Its owner feeds it what
the socket read (`receive`, which returns the plaintext that completes) and hands it plaintext to
encrypt (`send`); every byte to write to the socket, handshake and alerts included, accumulates
in `outgoing`, in order, which the owner writes and trims (`del outgoing[:sent]`) as its socket
takes it. Nothing blocks: the handshake advances whenever bytes arrive.

The broker's shards use it inside their epoll loop; the threaded client uses it too, so that its
reader thread and its writers never share an SSLSocket (OpenSSL forbids concurrent use of one
SSL object, so every call here must be made under one lock by a threaded owner).

Errors: `ssl.SSLError` (an OSError) and its subclasses, unchanged, e.g. SSLCertVerificationError.
"""
import ssl

READ_CHUNK = 256 * 1024


class TlsConnection:
    __slots__ = ("_context", "_hostname", "_obj", "_in", "_out", "established", "peer_closed", "outgoing")

    def __init__(self, context, server_side, server_hostname=None):
        self._context, self._hostname = context, server_hostname
        self._obj = self._in = self._out = None
        self.established = False    # handshake done: plaintext flows both ways
        self.peer_closed = False    # the peer sent close_notify: no more plaintext will come
        self.outgoing = bytearray()  # ciphertext to write to the socket, in order
        if not server_side:
            self._start(False)
            self._handshake()       # the client speaks first: its ClientHello is now in outgoing

    def _start(self, server_side):
        # A server's SSL object (~10 KB) is made when the first bytes come: a connection that never
        # sends anything costs what a plain one does.
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = self._context.wrap_bio(self._in, self._out, server_side=server_side,
                                           server_hostname=self._hostname)

    def receive(self, data):
        """Feed ciphertext read from the socket; returns the plaintext it completes (maybe b"").
        Raises ssl.SSLError when the peer breaks TLS (its alert, if any, is in `outgoing`)."""
        if self._obj is None:
            self._start(True)
        self._in.write(data)
        if not self.established and not self._handshake():
            return b""
        chunks = []
        while not self.peer_closed:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            finally:
                self._take_output()   # reading may answer (key update, close_notify)
            if not chunk:   # what read() gives once close_notify has come
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def send(self, data):
        """Encrypt plaintext; its records are appended to `outgoing`. Only once established."""
        with memoryview(data) as view:   # released on return: the caller may resize `data`
            done = 0
            while done < len(view):
                done += self._obj.write(view[done:])
        self._take_output()

    def close(self):
        """Append our close_notify to `outgoing` (when the handshake had finished)."""
        if self.established and not self.peer_closed:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass   # the peer's close_notify has not come: ours is written all the same
            self._take_output()

    def peer_certificate(self):
        return self._obj.getpeercert() if self.established else None

    def _handshake(self):
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        finally:
            self._take_output()
        self.established = True
        return True

    def _take_output(self):
        if self._out is not None and self._out.pending:
            self.outgoing += self._out.read()


def server_context(cert_file, key_file, client_ca_file=None):
    """The broker's context: its certificate chain and key; with client_ca_file, mutual TLS (a
    client must present a certificate signed by one of those CAs). Reads the files now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION   # a client could make the shard redo handshakes
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
