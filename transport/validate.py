"""The shape of every client op, checked before any actor sees it: types, ranges, lengths.

Pure functions, no I/O. The Session checks every frame here; the ConnectionActor checks the
control ops again (it must not trust a message for being from a shard). A control op's check
returns a clean copy of the frame holding only the fields the broker knows, so that nothing a
client nests in a field it made up is ever pickled into an actor message. A failure raises
`Invalid` with the code the client gets (`BAD_REQUEST`, or `BAD_TOPIC` for a topic name) and a
message that names the field. The bounds are documented in docs/protocol.md ("Limits and
validation").
"""
import re

from actorbroker.transport import errors as E

MAX_NAME_BYTES = 255               # topics, subscriptions, consumers, producers, client, keys, attrs
MAX_DELAY_MS = 7 * 24 * 3600 * 1000   # nack delay_ms, ack_timeout_ms: one week (timers overflow past 2^31 ms)
MAX_CREDITS = 2**32 - 1            # credits of one flow
MAX_TOTAL_CREDITS = 2**53          # what a consumer holds at most: more flows saturate there
MAX_COUNT = 2**32 - 1              # max_unacked, max_redeliveries
MAX_UINT64 = 2**64 - 1             # rids, message ids (what msgpack carries)

TOPIC_NAME = re.compile(r"/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
SUBSCRIPTION_TYPES = ("exclusive", "shared", "failover", "key_shared")
DISPATCH_MODES = ("non_reliable", "reliable")


class Invalid(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def is_uint(value, bound=MAX_UINT64):
    return type(value) is int and 0 <= value <= bound


def valid_topic(name):
    """`/namespace/name`, each part of [A-Za-z0-9_.-], at most 255 characters in all (no
    trailing newline: fullmatch, not match with `$`)."""
    return type(name) is str and len(name) <= MAX_NAME_BYTES and TOPIC_NAME.fullmatch(name) is not None


def fits_name(text):
    """At most MAX_NAME_BYTES bytes of UTF-8 (4 bytes a character bound it without encoding)."""
    return len(text) * 4 <= MAX_NAME_BYTES or len(text.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES


def name_problem(value, field, empty_ok=False):
    """Why `value` is not a valid name, or None."""
    if type(value) is not str:
        return f"'{field}' must be a str"
    if not value and not empty_ok:
        return f"'{field}' must not be empty"
    if not fits_name(value):
        return f"'{field}' must be at most {MAX_NAME_BYTES} bytes"
    if CONTROL_CHARS.search(value):
        return f"'{field}' must not contain control characters"
    return None


# --- field checks: each returns the value, or raises Invalid -------------------------------------

def topic(frame, field="topic"):
    value = frame.get(field)
    if type(value) is not str:
        raise Invalid(E.BAD_REQUEST, f"'{field}' must be a str")
    if not valid_topic(value):
        shown = value if len(value) <= 300 else value[:300] + "..."
        raise Invalid(E.BAD_TOPIC, f"bad {field} {shown!r}: expected /namespace/name "
                                   f"([A-Za-z0-9_.-]+ each part, at most {MAX_NAME_BYTES} characters)")
    return value


def name(frame, field, optional=False, empty_ok=False):
    value = frame.get(field)
    if value is None and optional:
        return None
    problem = name_problem(value, field, empty_ok)
    if problem:
        raise Invalid(E.BAD_REQUEST, problem)
    return value


def choice(frame, field, choices, optional=True):
    value = frame.get(field)
    if value is None and optional:
        return None
    if type(value) is not str or value not in choices:
        raise Invalid(E.BAD_REQUEST, f"'{field}' must be one of {', '.join(choices)}")
    return value


def uint(frame, field, bound, optional=False, default=None):
    value = frame.get(field)
    if value is None and optional:
        return default
    if not is_uint(value, bound):
        raise Invalid(E.BAD_REQUEST, f"'{field}' must be an int in [0, {bound}]")
    return value


def ident(frame, field):
    """A producer or consumer id: an int (one not open on the connection is the caller's to refuse)."""
    value = frame.get(field)
    if type(value) is not int:
        raise Invalid(E.BAD_REQUEST, f"'{field}' must be an int")
    return value


def ids(frame):
    value = frame.get("ids")
    if type(value) is not list or not all(type(i) is int and 0 <= i <= MAX_UINT64 for i in value):
        raise Invalid(E.BAD_REQUEST, "'ids' must be a list of ints >= 0")
    return list(dict.fromkeys(value))   # a repeated id counts once


# --- ops --------------------------------------------------------------------------------------

def hello(frame):
    """(client, token, heartbeat_ms wish or None); the version is the caller's: it decides first."""
    client = name(frame, "client", empty_ok=True)
    token = frame.get("token")
    if token is not None and type(token) is not str:
        raise Invalid(E.BAD_REQUEST, "'token' must be a str")
    wish = frame.get("heartbeat_ms")
    if wish is not None and type(wish) is not int:
        raise Invalid(E.BAD_REQUEST, "'heartbeat_ms' must be an int")
    return client, token, wish


def credits(frame):
    return uint(frame, "credits", MAX_CREDITS)


def delay(frame):
    return uint(frame, "delay_ms", MAX_DELAY_MS, optional=True, default=0)


def message_problem(payload, key, attrs, limit):
    """Why one message of a `send` is refused, or None. (The session's fast path takes the plain
    message, a bin payload alone, without calling this.)"""
    if type(payload) is not bytes:
        return "'payload' must be bin"
    if key is not None and type(key) is not str:
        return "'key' must be a str"
    if key and not fits_name(key):   # a key is data: any character may be in it, but no more bytes
        return f"'key' must be at most {MAX_NAME_BYTES} bytes"
    if attrs is not None and type(attrs) is not dict:
        return "'attrs' must be a map of str to str"
    if attrs:
        for k, v in attrs.items():
            if type(k) is not str or type(v) is not str:
                return "'attrs' must be a map of str to str"
            if not fits_name(k) or not fits_name(v):
                return f"'attrs' names and values must be at most {MAX_NAME_BYTES} bytes"
    # 4 bytes per character bounds UTF-8; measure exactly only when the bound is too big
    bound = len(payload) + 4 * len(key or "") + (
        sum(4 * (len(k) + len(v)) + 10 for k, v in attrs.items()) if attrs else 0)
    if bound > limit:
        size = len(payload) + len((key or "").encode()) + (
            sum(len(k.encode()) + len(v.encode()) + 10 for k, v in attrs.items()) if attrs else 0)
        if size > limit:
            return f"message of {size} bytes is too large to be delivered in one frame"
    return None


def _producer(frame):
    return {"topic": topic(frame), "name": name(frame, "name", optional=True),
            "dispatch": choice(frame, "dispatch", DISPATCH_MODES),
            "access": choice(frame, "access", ("shared", "exclusive")) or "shared"}


def _subscribe(frame):
    clean = {"topic": topic(frame), "subscription": name(frame, "subscription")}
    clean["type"] = choice(frame, "type", SUBSCRIPTION_TYPES, optional=False)
    clean["consumer"] = name(frame, "consumer")
    clean["start"] = choice(frame, "start", ("latest", "earliest")) or "latest"
    clean["dispatch"] = choice(frame, "dispatch", DISPATCH_MODES)
    clean["max_unacked"] = uint(frame, "max_unacked", MAX_COUNT, optional=True)
    clean["ack_timeout_ms"] = uint(frame, "ack_timeout_ms", MAX_DELAY_MS, optional=True)
    clean["max_redeliveries"] = uint(frame, "max_redeliveries", MAX_COUNT, optional=True)
    clean["dead_letter_topic"] = topic(frame, "dead_letter_topic") \
        if frame.get("dead_letter_topic") is not None else None
    return clean


_CONTROL = {
    "producer": _producer,
    "close_producer": lambda f: {"producer": ident(f, "producer")},
    "subscribe": _subscribe,
    "close_consumer": lambda f: {"consumer": ident(f, "consumer")},
    "unsubscribe": lambda f: {"consumer": ident(f, "consumer")},
    "topics": lambda f: {},
    "stats": lambda f: {"topic": topic(f)},
    "delete_topic": lambda f: {"topic": topic(f)},
    "lookup": lambda f: {"topic": topic(f)},
    "cluster": lambda f: {},
    "watch": lambda f: {"topics": name(f, "topics", optional=True) or "*"},   # a shell-style pattern
    "unwatch": lambda f: {},
    "broker_stats": lambda f: {},
}
CONTROL_OPS = frozenset(_CONTROL)


def control(frame):
    """A control or admin op's frame, checked: a new dict of op, rid and the known fields."""
    if type(frame) is not dict:
        raise Invalid(E.BAD_REQUEST, "a request must be a map")
    op, rid = frame.get("op"), frame.get("rid")
    check = _CONTROL.get(op) if type(op) is str else None
    if check is None:
        raise Invalid(E.UNKNOWN_OP, "not a control op")
    if not is_uint(rid):
        raise Invalid(E.BAD_REQUEST, f"'{op}' needs a 'rid' (int >= 0)")
    clean = check(frame)
    clean["op"], clean["rid"] = op, rid
    return clean
