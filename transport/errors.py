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
TOPIC_UNAVAILABLE = "TOPIC_UNAVAILABLE"   # cluster: the topic's node is lost (docs/protocol.md)
SLOW_CONSUMER = "SLOW_CONSUMER"
INTERNAL = "INTERNAL"

# Codes after which the broker closes the connection.
FATAL_CODES = frozenset({BAD_FRAME, FRAME_TOO_LARGE, NOT_CONNECTED, UNSUPPORTED_VERSION, AUTH_FAILED,
                         SLOW_CONSUMER})


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


# --- one exception class per code, so that callers can `except ConsumerBusy:` -----------------

class BadFrame(BrokerError): pass
class FrameTooLarge(BrokerError): pass
class NotConnected(BrokerError): pass
class UnsupportedVersion(BrokerError): pass
class AuthFailed(BrokerError): pass
class UnknownOp(BrokerError): pass
class BadRequest(BrokerError): pass
class BadTopic(BrokerError): pass
class NotAuthorized(BrokerError): pass
class ConsumerBusy(BrokerError): pass
class TypeMismatch(BrokerError): pass
class ProducerBusy(BrokerError): pass
class UnknownProducer(BrokerError): pass
class UnknownConsumer(BrokerError): pass
class TopicNotFound(BrokerError): pass
class Overloaded(BrokerError): pass
class TopicUnavailable(BrokerError): pass
class SlowConsumer(BrokerError): pass
class Internal(BrokerError): pass


_CLASS_OF_CODE = {
    BAD_FRAME: BadFrame, FRAME_TOO_LARGE: FrameTooLarge, NOT_CONNECTED: NotConnected,
    UNSUPPORTED_VERSION: UnsupportedVersion, AUTH_FAILED: AuthFailed, UNKNOWN_OP: UnknownOp,
    BAD_REQUEST: BadRequest, BAD_TOPIC: BadTopic, NOT_AUTHORIZED: NotAuthorized,
    CONSUMER_BUSY: ConsumerBusy, TYPE_MISMATCH: TypeMismatch, PRODUCER_BUSY: ProducerBusy,
    UNKNOWN_PRODUCER: UnknownProducer, UNKNOWN_CONSUMER: UnknownConsumer,
    TOPIC_NOT_FOUND: TopicNotFound, OVERLOADED: Overloaded, SLOW_CONSUMER: SlowConsumer,
    TOPIC_UNAVAILABLE: TopicUnavailable,
    INTERNAL: Internal,
}


def error_for(code, message="", rid=None):
    """The typed exception for a protocol error code (plain BrokerError for a code we do not know)."""
    return _CLASS_OF_CODE.get(code, BrokerError)(code, message, rid)


def error_from_frame(frame):
    """The typed exception carried by an `error` frame."""
    return error_for(frame.get("code", INTERNAL), frame.get("message", ""), frame.get("rid"))


class ConnectionLost(Exception):
    """The connection to the broker ended (closed by either side, or found dead by heartbeat)."""


class ConsumerClosed(Exception):
    """The consumer was closed, by the broker (`replaced`, `unsubscribed`, `topic_deleted`, ...)
    or by the application; `.reason` says which."""

    def __init__(self, reason):
        super().__init__(f"consumer closed: {reason}")
        self.reason = reason


class ProducerClosed(Exception):
    """The producer was closed, by the broker (`topic_deleted`, ...) or by the application."""

    def __init__(self, reason):
        super().__init__(f"producer closed: {reason}")
        self.reason = reason
