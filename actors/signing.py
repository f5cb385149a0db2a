"""HMAC-signed pickles on Thespian's TCP sockets: what arrives without this broker's MAC is refused
before it is unpickled.

Thespian's admin and actor sockets unpickle whatever they receive, so any process that reaches
them could run code as the broker. Thespian's TCP transport takes its serializer from a
module-level name, looked up at call time for every packet and every acknowledgement it reads;
`install` replaces it with `SignedPickle`, which prefixes each pickle with an HMAC-SHA256 under
the broker's secret and checks that MAC before `pickle.loads` sees a byte. The two
acknowledgement frames Thespian pickles once at import are made again with it, or every ack
would be refused and nothing (shutdown included) would complete.

Thespian forks the admin, the logger and every actor from the process that installed it, so they
all inherit the serializer and the secret; nothing is written to disk or to the environment.
"""
import hashlib
import hmac
import logging
import os
import pickle
import secrets

MAC_BYTES = hashlib.sha256().digest_size
MIN_SECRET_BYTES = 32
LOG_FIRST_REFUSALS = 20      # then one line every LOG_REFUSALS_EVERY: a flood must not fill the log
LOG_REFUSALS_EVERY = 1000


def _refusal_log():
    """Refusals are written straight to stderr (the broker log in every actor process): logging
    through Thespian would send a Thespian message from inside its own receive path."""
    logger = logging.getLogger("actorbroker.signing")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return logger


log = _refusal_log()


class UnsignedPacket(ValueError):
    """A Thespian packet whose MAC is missing or wrong: never unpickled."""


class SignedPickle:
    """pickle's dumps/loads with an HMAC-SHA256 in front of every pickle."""

    def __init__(self, secret):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)
        self.refused = 0

    @property
    def secret(self):
        return self._secret

    def _mac(self, body):
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def dumps(self, obj):
        body = pickle.dumps(obj)
        return self._mac(body) + body

    def loads(self, data):
        data = bytes(data)
        mac, body = data[:MAC_BYTES], data[MAC_BYTES:]
        if len(mac) < MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            self.refused += 1
            if self.refused <= LOG_FIRST_REFUSALS or self.refused % LOG_REFUSALS_EVERY == 0:
                log.warning("refused a Thespian packet of %d bytes without a valid signature "
                            "(%d refused by process %d so far)", len(data), self.refused, os.getpid())
            raise UnsignedPacket("Thespian packet without a valid signature")
        return pickle.loads(body)


def new_secret():
    return secrets.token_bytes(MIN_SECRET_BYTES)


def read_secret_file(path):
    """The secret in `path` (its bytes, surrounding whitespace stripped); refused unless only its
    owner can read it and it is long enough."""
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise ValueError(f"{path} is accessible to group or others (mode {mode & 0o777:o}): "
                             f"chmod 600 it")
        secret = f.read().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds {len(secret)} bytes; the cluster secret needs at least "
                         f"{MIN_SECRET_BYTES}")
    return secret


def install(secret):
    """Sign every Thespian packet this process (and every process forked from it) sends, and refuse
    the unsigned. Idempotent for one secret; a process keeps the first secret it installed."""
    from thespian.system.transport import TCPTransport, streamBuffer
    current = TCPTransport.serializer
    if isinstance(current, SignedPickle):
        if not hmac.compare_digest(current.secret, bytes(secret)):
            raise RuntimeError("Thespian is already signing with another secret in this process")
        return current
    signed = SignedPickle(secret)
    TCPTransport.serializer = signed
    for name, packet in (("ackMsg", streamBuffer.ackPacket), ("ackDataErrMsg", streamBuffer.ackDataErrPacket)):
        frame = streamBuffer.toSendBuffer(packet, signed.dumps)
        setattr(streamBuffer, name, frame)
        setattr(TCPTransport, name, frame)   # TCPTransport imported them by name
    return signed


def lane_secret():
    """The secret TCP lanes prove they know (transport/lanes.py), or None without signing."""
    signed = installed()
    return signed.secret if signed is not None else None


def installed():
    """The SignedPickle Thespian uses in this process, or None."""
    from thespian.system.transport import TCPTransport
    current = TCPTransport.serializer
    return current if isinstance(current, SignedPickle) else None
