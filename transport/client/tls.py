"""TLS for the Python clients: options, the client's SSLContext, and a blocking socket with TLS for
the threaded client.

    Client("broker.example", 6651, tls=TlsOptions(ca_file="ca.pem"))
    connect("tls://broker.example:6651", tls=TlsOptions(cert_file="me.pem", key_file="me.key"))

The certificate is verified against the CAs given (default: the system's) and its names
against the host connected to (or `server_name`), unless `check_hostname=False`.
"""
import threading
from collections import namedtuple

# ssl is imported only when a connection uses TLS: it is the heaviest import of the client (about
# 2 MB of the memory of a process that only speaks plain TCP, and time at its start).

TlsOptions = namedtuple("TlsOptions", ["ca_file", "cert_file", "key_file", "server_name", "check_hostname"],
                        defaults=[None, None, None, None, True])
TlsOptions.__doc__ = """TLS options of a client connection (immutable):
    ca_file: CAs to trust (PEM); default: the system's
    cert_file: our certificate chain, for mutual TLS
    key_file: its key (default: in cert_file)
    server_name: the name the broker's certificate must carry (default: the host connected to)
    check_hostname: False: any name in a certificate of a trusted CA"""


def client_context(tls):
    """An SSLContext from `tls`: a TlsOptions, True (system defaults) or an SSLContext."""
    import ssl
    if isinstance(tls, ssl.SSLContext):
        return tls
    options = tls if isinstance(tls, TlsOptions) else TlsOptions()
    context = ssl.create_default_context(cafile=options.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.cert_file:
        context.load_cert_chain(options.cert_file, options.key_file)
    context.check_hostname = options.check_hostname
    return context


def server_name(tls, host):
    """The name checked against the broker's certificate (and sent as SNI)."""
    name = tls.server_name if isinstance(tls, TlsOptions) else None
    return name or host


class TlsSocket:
    """A connected blocking socket with TLS over memory BIOs (transport/tls.py), with the socket
    methods the threaded client uses. Its reader thread calls recv while writers call sendall:
    an ssl.SSLSocket would share one SSL object between them, which OpenSSL does not allow; here
    every TLS call is made under one lock, and the socket I/O outside it."""

    def __init__(self, sock, context, hostname, timeout):
        from actorbroker.transport.tls import TlsConnection
        self._sock = sock
        self._tls = TlsConnection(context, server_side=False, server_hostname=hostname)
        self._tls_lock = threading.Lock()    # every call on self._tls
        self._send_lock = threading.Lock()   # ciphertext goes out in the order it was made
        self._plain = b""                    # application data that came with the handshake
        self._failure = None                 # the TLS error that ended reading (the broker's alert)
        sock.settimeout(timeout)
        while True:
            self._write_outgoing()
            if self._tls.established:
                break
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the broker closed the connection during the TLS handshake")
            self._plain += self._tls.receive(data)

    def recv(self, size):
        """Plaintext (b"" at the end of the stream)."""
        if self._plain:
            data, self._plain = self._plain, b""
            return data
        while True:
            data = self._sock.recv(size)
            if not data:
                return b""
            with self._tls_lock:
                try:
                    plain = self._tls.receive(data)
                except OSError as exc:   # ssl.SSLError is one
                    self._failure = exc
                    raise
                answer = bool(self._tls.outgoing)
            if answer:
                self._write_outgoing()
            if plain:
                return plain
            if self._tls.peer_closed:
                return b""

    def sendall(self, data, write=None):
        """write(raw socket, ciphertext): how the ciphertext goes out (default: its sendall)."""
        with self._send_lock:
            with self._tls_lock:
                if self._failure is not None:   # say why (not "EOF"), whichever thread notices first
                    raise self._failure
                self._tls.send(data)
            self._write_outgoing(locked=True, write=write)

    def _write_outgoing(self, locked=False, write=None):
        if not locked:
            with self._send_lock:
                return self._write_outgoing(True)
        with self._tls_lock:
            out = bytes(self._tls.outgoing)
            self._tls.outgoing.clear()
        if out:
            if write is None:
                self._sock.sendall(out)
            else:
                write(self._sock, out)

    def peer_certificate(self):
        with self._tls_lock:
            return self._tls.peer_certificate()

    def setsockopt(self, *args):
        self._sock.setsockopt(*args)

    def settimeout(self, timeout):
        self._sock.settimeout(timeout)

    def shutdown(self, how):
        self._sock.shutdown(how)

    def close(self):
        self._sock.close()
