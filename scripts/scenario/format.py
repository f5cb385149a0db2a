"""Scenario files: TOML (stdlib tomllib), one scenario per file, parsed and validated here.

Every error names the file, the step number (1-based, in file order) and the field, so that a
typo is reported before anything is started. See docs/scenarios.md for the format reference."""
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from actorbroker.transport.validate import MAX_UINT64

LIBRARY = Path(__file__).resolve().parent.parent / "scenarios"

# Bounds of what a step may ask, so that a slip (`inf`, `1e-300`, a count with 20 digits) is
# reported before anything starts, not as a hang or an OverflowError in the middle of a run.
MAX_SECONDS = 86400              # any duration (within, seconds, duration, ...): a day
MAX_RATE = 1_000_000             # messages per second (produce `rate`, churn `produce_rate`)
MAX_CHURN_RATE = 100             # churn events per second (each starts or stops a process)
MAX_CHURN_CONSUMERS = 100        # client processes of one churn
MAX_CHURN_KEYS = 100_000
MAX_INT = MAX_UINT64             # integers the protocol carries (msgpack: 64 bits)

SUB_TYPES = ("exclusive", "shared", "failover", "key_shared")
DISPATCH = ("non_reliable", "reliable")


class ScenarioError(Exception):
    """A scenario file that cannot be run: unreadable, not TOML, or a field that is wrong."""

    def __init__(self, path, message, step=None, field_name=None):
        where = str(path)
        if step is not None:
            where += f": step {step}"
        if field_name is not None:
            where += f": field '{field_name}'"
        super().__init__(f"{where}: {message}")
        self.path, self.step, self.field = path, step, field_name


@dataclass
class Step:
    number: int            # 1-based position in the file
    action: str
    fields: dict

    def get(self, name, default=None):
        return self.fields.get(name, default)

    def __getitem__(self, name):
        return self.fields[name]

    def title(self):
        shown = {k: v for k, v in self.fields.items() if k not in ("action", "comment", "steps")}
        text = " ".join(f"{k}={_short(v)}" for k, v in shown.items())
        return f"{self.action} {text}".strip()


def _short(value):
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Scenario:
    path: Path
    name: str
    description: str
    broker_options: list
    steps: list
    slow: bool = False
    start_broker: bool = True
    tags: list = field(default_factory=list)


# --- field types -------------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def t_str(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def t_int(v):
    return None if _is_int(v) and 0 <= v <= MAX_INT else f"must be an integer from 0 to {MAX_INT}"


def t_pos_int(v):
    return None if _is_int(v) and 0 < v <= MAX_INT else f"must be an integer from 1 to {MAX_INT}"


def t_up_to(top):
    def check(v):
        return None if _is_int(v) and 0 < v <= top else f"must be an integer from 1 to {top}"
    return check


def t_seconds(v):
    ok = _is_num(v) and 0 < v <= MAX_SECONDS
    return None if ok else f"must be a number of seconds > 0 and at most {MAX_SECONDS} (a day)"


def t_rate(top):
    def check(v):
        ok = _is_num(v) and 1 / MAX_SECONDS <= v <= top
        return None if ok else f"must be a rate per second from 1/{MAX_SECONDS} (one a day) to {top}"
    return check


def t_bool(v):
    return None if isinstance(v, bool) else "must be true or false"


def t_strs(v):
    ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    return None if ok else "must be a list of strings"


def t_ints(v):
    ok = isinstance(v, list) and all(_is_int(x) and 0 <= x <= MAX_INT for x in v)
    return None if ok else f"must be a list of integers from 0 to {MAX_INT}"


def t_table(v):
    return None if isinstance(v, dict) else "must be a table"


def non_finite(v):
    """The first non-finite number (inf, -inf, nan) in a value, lists and tables included."""
    if isinstance(v, float) and not math.isfinite(v):
        return v
    for x in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
        if (bad := non_finite(x)) is not None:
            return bad
    return None


def t_str_table(v):
    ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    return None if ok else "must be a table of strings"


def t_topic(v):
    if not isinstance(v, str) or not v.startswith("/") or v.count("/") != 2:
        return "must be a topic name /namespace/name"
    return None


def t_share(v):
    return None if _is_num(v) and 0 <= v <= 1 else "must be a number from 0 to 1"


def t_choice(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}"
    return check


def t_credits(v):
    if v == "auto" or (_is_int(v) and v >= 0):
        return None
    return "must be \"auto\" or an integer >= 0"


def t_any(v):
    return None


def t_events(v):
    ok = isinstance(v, list) and v and all(isinstance(e, dict) and isinstance(e.get("kind"), str) for e in v)
    return None if ok else "must be a non-empty list of tables, each with a `kind`"


def t_error_code(v):
    return None if isinstance(v, str) and v.isupper() and v else "must be an error code such as CONSUMER_BUSY"


# Per action: field -> (check, required). Every step also takes `comment` (free text).
RESTART = {"options": (t_strs, False), "kill": (t_bool, False), "within": (t_seconds, False)}
BROKER = {
    "start": {"options": (t_strs, False), "within": (t_seconds, False)},
    "restart": RESTART,
    "restart_broker": RESTART,
    "stop": {"within": (t_seconds, False)},
    "kill9": {},
}
CLIENT = {
    "open": {"client": (t_str, True), "heartbeat_ms": (t_pos_int, False), "reconnect": (t_bool, False),
             "reconnect_within": (t_seconds, False)},
    "close": {"client": (t_str, True)},
    "kill": {"client": (t_str, True)},
    "freeze": {"client": (t_str, True)},
    "flood": {"client": (t_str, True), "bytes": (t_pos_int, False), "within": (t_seconds, False)},
    "thaw": {"client": (t_str, True)},
}
MESSAGES = {  # how an expect/ack step names messages: one of these
    "messages": (t_str, False), "ids": (t_ints, False), "payloads": (t_strs, False),
    "count": (t_int, False),
}
ACTIONS = {
    **BROKER, **CLIENT,
    "producer": {"client": (t_str, True), "producer": (t_str, True), "topic": (t_topic, True),
                 "dispatch": (t_choice(*DISPATCH), False), "name": (t_str, False),
                 "access": (t_choice("shared", "exclusive"), False), "expect_error": (t_error_code, False)},
    "produce": {"producer": (t_str, True), "count": (t_pos_int, True), "payload": (t_str, False),
                "keys": (t_strs, False), "attrs": (t_str_table, False), "rate": (t_rate(MAX_RATE), False),
                "as": (t_str, False), "within": (t_seconds, False), "expect_error": (t_error_code, False)},
    "subscribe": {"client": (t_str, True), "consumer": (t_str, True), "as": (t_str, False),
                  "topic": (t_topic, True), "subscription": (t_str, True),
                  "type": (t_choice(*SUB_TYPES), True), "dispatch": (t_choice(*DISPATCH), False),
                  "start": (t_choice("earliest", "latest"), False), "credits": (t_credits, False),
                  "receiver_queue": (t_pos_int, False), "ack": (t_choice("auto", "manual"), False),
                  "max_unacked": (t_pos_int, False), "ack_timeout_ms": (t_pos_int, False),
                  "max_redeliveries": (t_int, False), "dead_letter_topic": (t_topic, False),
                  "expect_error": (t_error_code, False)},
    "flow": {"consumer": (t_str, True), "credits": (t_pos_int, True), "expect_error": (t_error_code, False)},
    "ack": {"consumer": (t_str, True), "messages": (t_str, False), "ids": (t_ints, False),
            "all": (t_bool, False), "expect_error": (t_error_code, False)},
    "nack": {"consumer": (t_str, True), "messages": (t_str, False), "ids": (t_ints, False),
             "all": (t_bool, False), "delay_ms": (t_int, False), "expect_error": (t_error_code, False)},
    "close_consumer": {"consumer": (t_str, True), "expect_error": (t_error_code, False)},
    "close_producer": {"producer": (t_str, True), "expect_error": (t_error_code, False)},
    "unsubscribe": {"consumer": (t_str, True), "expect_error": (t_error_code, False)},
    "expect": {"consumer": (t_str, False), "consumers": (t_strs, False), **MESSAGES,
               "order": (t_bool, False), "only": (t_bool, False), "redelivered": (t_bool, False),
               "sticky_keys": (t_bool, False), "keep": (t_bool, False), "within": (t_seconds, False)},
    "expect_active": {"consumer": (t_str, True), "active": (t_bool, True), "within": (t_seconds, False)},
    "expect_closed": {"consumer": (t_str, False), "consumers": (t_strs, False), "count": (t_pos_int, False),
                      "reason": (t_str, False), "within": (t_seconds, False)},
    "expect_lost": {"client": (t_str, True), "code": (t_error_code, False), "within": (t_seconds, False)},
    "expect_reconnected": {"client": (t_str, True), "times": (t_pos_int, False), "within": (t_seconds, False)},
    "expect_stats": {"client": (t_str, True), "topic": (t_topic, True), "subscription": (t_str, False),
                     "consumer": (t_str, False), "values": (t_table, True), "within": (t_seconds, False)},
    "watch": {"topics": (t_str, False)},
    "expect_events": {"events": (t_events, True), "within": (t_seconds, False)},
    # + fields of the expect it names, or `task` (a background step) with `within`
    "wait": {"until": (t_choice("active", "closed", "lost", "stats", "messages"), False),
             "task": (t_str, False), "within": (t_seconds, False)},
    "parallel": {"steps": (t_any, True), "refused": (t_int, False), "refused_with": (t_error_code, False)},
    "pause": {"seconds": (t_seconds, True)},
    "churn": {"topic": (t_topic, True), "subscription": (t_str, True),
              "type": (t_choice("shared", "key_shared", "failover"), True),
              "dispatch": (t_choice(*DISPATCH), False), "duration": (t_seconds, True),
              "rate": (t_rate(MAX_CHURN_RATE), True), "seed": (t_int, True),
              "produce_rate": (t_rate(MAX_RATE), False), "keys": (t_up_to(MAX_CHURN_KEYS), False),
              "min_consumers": (t_up_to(MAX_CHURN_CONSUMERS), False),
              "max_consumers": (t_up_to(MAX_CHURN_CONSUMERS), False), "receiver_queue": (t_pos_int, False),
              "heartbeat_ms": (t_pos_int, False), "drain_within": (t_seconds, False),
              "kill_share": (t_share, False)},
}
# Any step but these may run in the background (`background = true`, named by `task`).
NOT_IN_BACKGROUND = ("parallel", "wait", "start", "stop", "restart", "restart_broker", "kill9", "churn")
WAIT_AS = {"active": "expect_active", "closed": "expect_closed", "lost": "expect_lost",
           "stats": "expect_stats", "messages": "expect"}
TOP = {"name": t_str, "description": t_str, "broker": t_table, "step": None, "slow": t_bool,
       "tags": t_strs}
BROKER_TABLE = {"options": t_strs, "start": t_bool}


def load(path):
    """Parse and validate one scenario file; raises ScenarioError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ScenarioError(path, f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(path, f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, f"not UTF-8 (TOML files are): byte {exc.start} cannot be read") from None
    for key, value in data.items():
        if key not in TOP:
            raise ScenarioError(path, f"unknown top-level field (known: {', '.join(TOP)})", field_name=key)
        check = TOP[key]
        if check and (problem := check(value)):
            raise ScenarioError(path, problem, field_name=key)
    for key in ("name", "description"):
        if key not in data:
            raise ScenarioError(path, "missing", field_name=key)
    broker = data.get("broker", {})
    for key, value in broker.items():
        if key not in BROKER_TABLE:
            raise ScenarioError(path, "unknown field of [broker] (known: options, start)",
                                field_name=f"broker.{key}")
        if problem := BROKER_TABLE[key](value):
            raise ScenarioError(path, problem, field_name=f"broker.{key}")
    raw_steps = data.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ScenarioError(path, "a scenario needs at least one [[step]]", field_name="step")
    steps = [validate_step(path, i, raw) for i, raw in enumerate(raw_steps, 1)]
    check_references(path, steps)
    return Scenario(path=path, name=data["name"], description=data["description"],
                    broker_options=list(broker.get("options", [])), steps=steps,
                    slow=data.get("slow", False), start_broker=broker.get("start", True),
                    tags=data.get("tags", []))


def validate_step(path, number, raw):
    if not isinstance(raw, dict):
        raise ScenarioError(path, "a step must be a table", step=number)
    action = raw.get("action")
    if action is None:
        raise ScenarioError(path, "missing", step=number, field_name="action")
    if action not in ACTIONS:
        raise ScenarioError(path, f"unknown action {action!r} (known: {', '.join(sorted(ACTIONS))})",
                            step=number, field_name="action")
    schema = dict(ACTIONS[action])
    if action == "wait":
        until = raw.get("until")
        if until in WAIT_AS:
            schema.update(ACTIONS[WAIT_AS[until]])
        if ("until" in raw) == ("task" in raw):
            raise ScenarioError(path, "give exactly one of until, task", step=number, field_name="until")
    if action not in NOT_IN_BACKGROUND:
        schema.update({"background": (t_bool, False), "task": (t_str, False)})
        if "task" in raw and not raw.get("background"):
            raise ScenarioError(path, "`task` names a background step: add background = true",
                                step=number, field_name="task")
    for key, value in raw.items():
        if key in ("action", "comment"):
            continue
        if key not in schema:
            raise ScenarioError(path, f"not a field of '{action}' (known: {', '.join(schema)})",
                                step=number, field_name=key)
        if key != "steps" and (bad := non_finite(value)) is not None:   # a group's steps: each checked
            raise ScenarioError(path, f"must be a finite number, not {bad}", step=number, field_name=key)
        if problem := schema[key][0](value):
            raise ScenarioError(path, problem, step=number, field_name=key)
    for key, (_, required) in schema.items():
        if required and key not in raw:
            raise ScenarioError(path, "missing", step=number, field_name=key)
    target = WAIT_AS.get(raw.get("until")) if action == "wait" else action
    if target == "expect":
        given = [k for k in ("messages", "ids", "payloads", "count") if k in raw]
        if len(given) != 1:
            raise ScenarioError(path, "give exactly one of messages, ids, payloads, count",
                                step=number, field_name="messages")
        if ("consumer" in raw) == ("consumers" in raw):
            raise ScenarioError(path, "give exactly one of consumer, consumers", step=number,
                                field_name="consumer")
    if action in ("ack", "nack"):
        given = [k for k in ("messages", "ids", "all") if k in raw]
        if len(given) != 1:
            raise ScenarioError(path, "give exactly one of messages, ids, all", step=number,
                                field_name="messages")
    if action == "produce" and "keys" in raw and not raw["keys"]:
        raise ScenarioError(path, "must not be empty", step=number, field_name="keys")
    if action == "produce" and "rate" in raw and (raw["count"] - 1) / raw["rate"] > MAX_SECONDS:
        raise ScenarioError(path, f"count = {raw['count']} at this rate takes more than {MAX_SECONDS} s (a day)",
                            step=number, field_name="rate")
    if action == "churn" and raw.get("min_consumers", 1) > raw.get("max_consumers", 4):
        raise ScenarioError(path, "must not exceed max_consumers", step=number, field_name="min_consumers")
    if action == "expect_closed" and ("consumer" in raw) == ("consumers" in raw):
        raise ScenarioError(path, "give exactly one of consumer, consumers", step=number, field_name="consumer")
    fields = dict(raw)
    if action == "parallel":
        fields["steps"] = parallel_steps(path, number, raw)
    return Step(number=number, action=action, fields=fields)


# Which field of a step names which kind of handle, and which steps make one.
USES = {"client": "client", "producer": "producer", "consumer": "consumer", "consumers": "consumer",
        "messages": "label"}


def _made(step):
    """(kind, name) of the handles a step makes."""
    a = step.action
    if a == "open":
        yield "client", step["client"]
    elif a == "producer":
        yield "producer", step["producer"]
    elif a == "subscribe":
        yield "consumer", step.get("as", step["consumer"])
    elif a == "produce" and step.get("as"):
        yield "label", step["as"]
    if step.get("background") and step.get("task"):
        yield "task", step["task"]


def _used(step):
    """(field, kind, name) of the handles a step names; the steps that make them name them too."""
    if step.action == "open":
        return
    for field_name, kind in USES.items():
        if field_name not in step.fields:
            continue
        if (step.action, field_name) in (("producer", "producer"), ("subscribe", "consumer"),
                                         ("expect_stats", "consumer")):   # made here / a broker name
            continue
        value = step[field_name]
        for name in value if isinstance(value, list) else [value]:
            yield field_name, kind, name
    if step.action == "wait" and "task" in step.fields:
        yield "task", "task", step["task"]


def check_references(path, steps):
    """Every client, producer, consumer, `as` label and task a step names is made by a step before
    it (or by another step of its parallel group): a typo is reported before anything starts."""
    made = set()
    for step in steps:
        group = step["steps"] if step.action == "parallel" else [step]
        for inner in group:
            made.update(_made(inner))
        for inner in group:
            for field_name, kind, name in _used(inner):
                if (kind, name) not in made:
                    raise ScenarioError(path, f"no step before this one makes the {kind} {name!r}",
                                        step=step.number, field_name=field_name)


def parallel_steps(path, number, raw):
    """The steps of a `parallel` group ([[step.steps]]), checked like steps; they cannot nest."""
    inner = raw["steps"]
    if not isinstance(inner, list) or len(inner) < 2:
        raise ScenarioError(path, "a parallel group needs at least two [[step.steps]]", step=number,
                            field_name="steps")
    steps = []
    for i, sub in enumerate(inner, 1):
        try:
            step = validate_step(path, number, sub)
        except ScenarioError as exc:
            raise ScenarioError(path, f"in [[step.steps]] {i}: {exc}".replace(f"{path}: ", "", 1),
                                step=number, field_name="steps") from None
        if step.action in NOT_IN_BACKGROUND or step.get("background"):
            raise ScenarioError(path, f"in [[step.steps]] {i}: '{step.action}' cannot be in a parallel group",
                                step=number, field_name="steps")
        steps.append(step)
    if raw.get("refused", 0) > len(steps):
        raise ScenarioError(path, "more than the steps of the group", step=number, field_name="refused")
    if ("refused" in raw) != ("refused_with" in raw):
        raise ScenarioError(path, "give refused and refused_with together", step=number, field_name="refused")
    return steps


def library():
    """The scenario files shipped with actorbroker, sorted by file name."""
    return sorted(LIBRARY.glob("*.toml"))


def resolve(name):
    """A path as given, or the name of a library scenario (file stem, with or without .toml)."""
    p = Path(name)
    if p.exists():
        return p
    candidate = LIBRARY / (p.name if p.suffix == ".toml" else p.name + ".toml")
    return candidate if candidate.exists() else p
