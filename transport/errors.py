"""Error codes of the wire protocol (PROTOCOL.md, "Errors") and the exceptions that carry them."""

BAD_FRAME = "BAD_FRAME"
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
NOT_CONNECTED = "NOT_CONNECTED"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
AUTH_FAILED = "AUTH_FAILED"
UNKNOWN_OP = "UNKNOWN_OP"
BAD_REQUEST = "BAD_REQUEST"
BAD_TOPIC = "BAD_TOPIC"
NOT_AUTHORIZED = "NOT_AUTHORIZED"
CONSUMER_BUSY = "CONSUMER_BUSY"
TYPE_MISMATCH = "TYPE_MISMATCH"
PRODUCER_BUSY = "PRODUCER_BUSY"
UNKNOWN_PRODUCER = "UNKNOWN_PRODUCER"
UNKNOWN_CONSUMER = "UNKNOWN_CONSUMER"
TOPIC_NOT_FOUND = "TOPIC_NOT_FOUND"
OVERLOADED = "OVERLOADED"
INTERNAL = "INTERNAL"

# Codes after which the broker closes the connection.
FATAL_CODES = frozenset({BAD_FRAME, FRAME_TOO_LARGE, NOT_CONNECTED, UNSUPPORTED_VERSION, AUTH_FAILED})


class BrokerError(Exception):
    """An `error` frame from the broker, raised by the clients; `.code` is the protocol code."""

    def __init__(self, code, message="", rid=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.rid = rid


class ProtocolError(Exception):
    """Raised by the frame codec on bytes that break the framing rules."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
