"""Runs a scenario: a broker (LocalBroker), client agents (one OS process each), the steps in
order, invariants checked on every message that arrives; prints each step with its outcome and
time. Every process it starts is stopped by PID at the end, whatever happens."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from actorbroker.scripts import proctree
from actorbroker.scripts.local_broker import LocalBroker

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_WITHIN = 10.0
REQUEST_TIMEOUT = 30.0


class StepFailed(Exception):
    """A step whose expectation did not hold; `detail` is the expected vs arrived text."""

    def __init__(self, message, detail=""):
        super().__init__(message)
        self.detail = detail


@dataclass
class ConsumerState:
    handle: str
    client: str
    name: str
    topic: str
    subscription: str
    type: str
    id: int = None
    received: list = field(default_factory=list)   # message events, in arrival order
    cursor: int = 0                                  # received[:cursor] were consumed by expects
    active: bool = None
    closed: str = None                               # reason, once closed
    gone: bool = False                               # its client was closed, killed or lost


class AgentProcess:
    """One client agent (scripts/scenario/agent.py) and the reader of its stdout."""

    def __init__(self, runner, name, heartbeat_ms=None):
        self.runner, self.name = runner, name
        host, port = runner.broker.address
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actorbroker.scripts.scenario.agent", host, str(port), name, str(heartbeat_ms or 0)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=runner.agent_stderr,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.pid = self.proc.pid
        self.replies = {}
        self.rids = 0
        self.ready = None            # the ready/fatal event
        self.lost = None             # reason, once the client saw its connection end
        self.exited = False
        self.frozen = False
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        cond = self.runner.cond
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with cond:
                if "rid" in ev:
                    self.replies[ev["rid"]] = ev
                elif ev.get("event") in ("ready", "fatal"):
                    self.ready = ev
                elif ev.get("event") == "lost":
                    self.lost = ev.get("reason", "lost")
                else:
                    self.runner.on_event(self, ev)
                cond.notify_all()
        with cond:
            self.exited = True
            cond.notify_all()

    def wait_ready(self, timeout=30):
        r = self.runner
        r.wait_until(lambda: self.ready is not None or self.exited, timeout, "the client agent to start")
        if not self.ready or self.ready.get("event") != "ready":
            raise StepFailed(f"client {self.name} could not connect: "
                             f"{(self.ready or {}).get('error', 'agent exited')}")

    def send(self, cmd, **fields):
        with self.runner.cond:
            self.rids += 1
            rid = self.rids
        line = json.dumps({"cmd": cmd, "rid": rid, **fields}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise StepFailed(f"client {self.name} is not running") from None
        return rid

    def result(self, rid, timeout=REQUEST_TIMEOUT, what="reply"):
        self.runner.wait_until(lambda: rid in self.replies or self.exited, timeout,
                               f"client {self.name} to answer ({what})")
        if rid not in self.replies:
            raise StepFailed(f"client {self.name} exited before answering ({what})")
        return self.replies.pop(rid)

    def request(self, cmd, timeout=REQUEST_TIMEOUT, **fields):
        reply = self.result(self.send(cmd, **fields), timeout, cmd)
        return reply

    def kill(self):
        if self.proc.poll() is None:
            if self.frozen:
                self._signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()

    def _signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def close_pipes(self):
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass


class Runner:
    def __init__(self, scenario, out=None, workdir=None, keep=False, verbose=False):
        self.scenario, self.out, self.verbose = scenario, out or sys.stdout, verbose
        self.keep = keep
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="actorbroker-scenario-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "broker"
        self.agent_stderr = open(self.workdir / "agents.stderr", "ab")
        self.cond = threading.Condition()
        self.broker = None
        self.brokers = []               # every LocalBroker started (stopped at the end)
        self.agents = {}                # client name -> AgentProcess
        self.all_agents = []
        self.consumers = {}             # handle -> ConsumerState
        self.producers = {}             # handle -> (client, topic)
        self.labels = {}                # produce `as` -> [(offset, payload, key)]
        self.produced = Counter()       # producer handle -> messages produced (payload index)
        self.seen = {}                  # (topic, subscription) -> {id: unflagged deliveries}
        self.key_owner = {}             # (topic, subscription) -> {key: consumer handle}
        self.violations = []
        self.results = []               # (step, ok, seconds, message)
        self.failure = None
        self.log = []                   # lines printed (for JUnit)

    # --- output --------------------------------------------------------------------------------

    def say(self, text=""):
        self.log.append(text)
        print(text, file=self.out, flush=True)

    # --- events from agents (called under self.cond) -------------------------------------------

    def on_event(self, agent, ev):
        kind = ev.get("event")
        c = self.consumers.get(ev.get("consumer"))
        if c is None:
            return
        if kind == "message":
            c.received.append(ev)
            if ev["n"] > ev["granted"]:
                self.violations.append(
                    f"credits exceeded: consumer {c.handle} got its message #{ev['n']} (id {ev['id']}) "
                    f"with only {ev['granted']} credits granted")
            seen = self.seen.setdefault((c.topic, c.subscription), {})
            if ev["redeliveries"] == 0:
                if ev["id"] in seen:
                    self.violations.append(
                        f"duplicate: id {ev['id']} delivered again to {c.handle} (subscription "
                        f"{c.subscription}) without the redelivery flag")
                seen[ev["id"]] = seen.get(ev["id"], 0) + 1
            else:
                seen.setdefault(ev["id"], 0)
        elif kind == "active":
            c.active = ev["active"]
        elif kind == "closed":
            c.closed = ev.get("reason", "closed")

    def wait_until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StepFailed(f"timed out after {timeout:g}s waiting for {what}")
                self.cond.wait(min(left, 0.1))

    # --- helpers -------------------------------------------------------------------------------

    def agent(self, name):
        a = self.agents.get(name)
        if a is None:
            raise StepFailed(f"no client named {name!r} is open")
        return a

    def consumer(self, handle):
        c = self.consumers.get(handle)
        if c is None:
            raise StepFailed(f"no consumer {handle!r} (subscribe it first)")
        return c

    def need_broker(self):
        if self.broker is None:
            raise StepFailed("the broker is not running (start it first)")

    def ids_of(self, step):
        if "messages" in step.fields:
            label = step["messages"]
            if label not in self.labels:
                raise StepFailed(f"no produce step named {label!r} (its `as`) ran before")
            return [m[0] for m in self.labels[label]]
        return list(step.get("ids", []))

    def start_broker(self, options):
        opts = list(self.scenario.broker_options) + list(options or [])
        t = time.monotonic()
        self.broker = LocalBroker(self.data_dir, *opts)
        self.brokers.append(self.broker)
        self.seen.clear()   # after a (re)start, unacknowledged messages may come again unflagged
        return f"broker on {self.broker.host}:{self.broker.port} in {time.monotonic() - t:.2f}s"

    def broker_gone(self):
        """Clients of a stopped broker lose their connection; their consumers are gone."""
        self.broker = None
        for c in self.consumers.values():
            c.gone = True

    # --- steps ---------------------------------------------------------------------------------

    def step_start(self, s):
        if self.broker is not None:
            raise StepFailed("the broker is already running")
        return self.start_broker(s.get("options"))

    def step_stop(self, s):
        self.need_broker()
        left = self.broker.stop()
        self.broker_gone()
        if left:
            raise StepFailed(f"broker processes left after stop: {left}")
        return "stopped"

    def step_kill9(self, s):
        self.need_broker()
        left = self.broker.kill_all()
        self.broker.stderr.close()
        self.broker.proc.stdout.close()
        self.broker_gone()
        if left:
            raise StepFailed(f"broker processes survived kill -9: {left}")
        return "every broker process killed with SIGKILL"

    def step_restart(self, s):
        self.step_kill9(s) if s.get("kill") else self.step_stop(s)
        return self.start_broker(s.get("options"))

    def step_open(self, s):
        self.need_broker()
        name = s["client"]
        old = self.agents.get(name)
        if old is not None and old.proc.poll() is None:
            raise StepFailed(f"client {name!r} is already open")
        a = AgentProcess(self, name, s.get("heartbeat_ms"))
        self.agents[name] = a
        self.all_agents.append(a)
        a.wait_ready()
        return f"pid {a.pid}, heartbeat {a.ready.get('heartbeat_ms')} ms"

    def _client_gone(self, name):
        for c in self.consumers.values():
            if c.client == name:
                c.gone = True

    def step_close(self, s):
        a = self.agent(s["client"])
        reply = a.request("close")
        try:
            a.proc.wait(10)
        except subprocess.TimeoutExpired:
            a.kill()
        self._client_gone(s["client"])
        del self.agents[s["client"]]
        if not reply.get("ok"):
            raise StepFailed(f"close failed: {reply.get('error')}")
        return "closed"

    def step_kill(self, s):
        a = self.agent(s["client"])
        a.kill()
        self._client_gone(s["client"])
        del self.agents[s["client"]]
        return f"pid {a.pid} killed with SIGKILL"

    def step_freeze(self, s):
        a = self.agent(s["client"])
        a._signal(signal.SIGSTOP)
        a.frozen = True
        return f"pid {a.pid} stopped (SIGSTOP)"

    def step_thaw(self, s):
        a = self.agent(s["client"])
        a._signal(signal.SIGCONT)
        a.frozen = False
        return f"pid {a.pid} continued (SIGCONT)"

    def step_producer(self, s):
        a = self.agent(s["client"])
        reply = a.request("producer", handle=s["producer"], topic=s["topic"], dispatch=s.get("dispatch"),
                          name=s.get("name"), access=s.get("access"))
        if not reply["ok"]:
            raise StepFailed(f"producer refused: {reply['error']}")
        self.producers[s["producer"]] = (s["client"], s["topic"])
        return f"producer id {reply['producer']} ({reply['dispatch']})"

    def step_produce(self, s):
        handle = s["producer"]
        if handle not in self.producers:
            raise StepFailed(f"no producer {handle!r}")
        client, _ = self.producers[handle]
        a = self.agent(client)
        count, rate = s["count"], s.get("rate")
        within = s.get("within", REQUEST_TIMEOUT + (count / rate if rate else 0))
        start = self.produced[handle]
        reply = a.request("produce", timeout=within + 5, handle=handle, count=count,
                          payload=s.get("payload", handle + "-{i}"), keys=s.get("keys"),
                          attrs=s.get("attrs"), rate=rate, start=start, within=within)
        if not reply["ok"]:
            raise StepFailed(f"produce failed: {reply['error']}")
        self.produced[handle] += count
        sent = [tuple(x) for x in reply["sent"]]
        if s.get("as"):
            self.labels[s["as"]] = sent
        if reply.get("error") or len(sent) != count:
            raise StepFailed(f"{len(sent)} of {count} messages got a receipt: {reply.get('error')}")
        return f"{count} receipted, ids {sent[0][0]}..{sent[-1][0]}"

    def step_subscribe(self, s):
        a = self.agent(s["client"])
        handle = s.get("as", s["consumer"])
        state = ConsumerState(handle=handle, client=s["client"], name=s["consumer"], topic=s["topic"],
                              subscription=s["subscription"], type=s["type"])
        with self.cond:
            old = self.consumers.get(handle)
            if old is not None and not old.gone and old.closed is None:
                raise StepFailed(f"consumer handle {handle!r} is in use (give this one another `as`)")
            self.consumers[handle] = state   # before the reply: its first pushes may overtake it
        fields = {k: s.get(k) for k in ("topic", "subscription", "type", "consumer", "dispatch", "start",
                                         "receiver_queue", "ack", "max_unacked", "ack_timeout_ms",
                                         "max_redeliveries", "dead_letter_topic") if k in s.fields}
        reply = a.request("subscribe", handle=handle, credits=s.get("credits", "auto"), **fields)
        expected_error = s.get("expect_error")
        if not reply["ok"]:
            with self.cond:
                del self.consumers[handle]
                if old is not None:
                    self.consumers[handle] = old
            if expected_error and reply.get("code") == expected_error:
                return f"refused with {expected_error}, as expected"
            raise StepFailed(f"subscribe refused: {reply['error']}",
                             f"expected: {expected_error or 'subscribed'}\narrived: {reply.get('code')}")
        if expected_error:
            raise StepFailed(f"subscribe succeeded, expected {expected_error}")
        state.id = reply["consumer"]
        return f"consumer id {state.id} ({reply['dispatch']})"

    def step_flow(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("flow", handle=c.handle, credits=s["credits"])
        if not reply["ok"]:
            raise StepFailed(f"flow failed: {reply['error']}")
        return f"+{s['credits']} credits"

    def _settle(self, s, op):
        c = self.consumer(s["consumer"])
        fields = {"handle": c.handle}
        if s.get("all"):
            fields["all"] = True
        else:
            fields["ids"] = self.ids_of(s)
        if op == "nack" and "delay_ms" in s.fields:
            fields["delay_ms"] = s["delay_ms"]
        reply = self.agent(c.client).request(op, **fields)
        if not reply["ok"]:
            raise StepFailed(f"{op} failed: {reply['error']}")
        return f"{op}ed {len(reply['ids'])} ids"

    def step_ack(self, s):
        return self._settle(s, "ack")

    def step_nack(self, s):
        return self._settle(s, "nack")

    def step_close_consumer(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("close_consumer", handle=c.handle)
        if not reply["ok"]:
            raise StepFailed(f"close_consumer failed: {reply['error']}")
        c.gone = True
        return "closed"

    def step_unsubscribe(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("unsubscribe", handle=c.handle)
        if not reply["ok"]:
            raise StepFailed(f"unsubscribe failed: {reply['error']}")
        c.gone = True
        with self.cond:
            self.seen.pop((c.topic, c.subscription), None)
        return "unsubscribed"

    # --- expectations --------------------------------------------------------------------------

    def _window(self, handles):
        return [(h, m) for h in handles for m in self.consumers[h].received[self.consumers[h].cursor:]]

    @staticmethod
    def _show(window):
        by = {}
        for h, m in window:
            flag = f"(r{m['redeliveries']})" if m["redeliveries"] else ""
            by.setdefault(h, []).append(f"{m['id']}{flag}:{m['payload']}")
        return "; ".join(f"{h}: [{', '.join(v)}]" for h, v in by.items()) or "nothing"

    def step_expect(self, s):
        handles = s.get("consumers") or [s["consumer"]]
        for h in handles:
            self.consumer(h)
        within = s.get("within", DEFAULT_WITHIN)
        only, order = s.get("only", True), s.get("order", True)
        want_ids = set(self.ids_of(s)) if ("messages" in s.fields or "ids" in s.fields) else None
        want_payloads = Counter(s["payloads"]) if "payloads" in s.fields else None
        count = s.get("count")
        if want_ids is not None:
            expected_text = f"ids {sorted(want_ids)}"
        elif want_payloads is not None:
            expected_text = f"payloads {s['payloads']}"
        else:
            expected_text = f"{count} messages"

        def satisfied():
            window = self._window(handles)
            if want_ids is not None:
                return want_ids <= {m["id"] for _, m in window}
            if want_payloads is not None:
                return not (want_payloads - Counter(m["payload"] for _, m in window))
            return len(window) >= count

        try:
            self.wait_until(satisfied, within, expected_text)
        except StepFailed as exc:
            with self.cond:
                arrived = self._show(self._window(handles))
            raise StepFailed(str(exc), f"expected: {expected_text} at {', '.join(handles)}\n"
                                       f"arrived:  {arrived}") from None
        with self.cond:
            window = self._window(handles)
            if count is not None and want_ids is None and want_payloads is None:
                extra = window[count:]
                window = window[:count]
            elif want_ids is not None:
                extra = [(h, m) for h, m in window if m["id"] not in want_ids]
            else:
                left = Counter(want_payloads)
                extra = []
                for h, m in window:
                    if left[m["payload"]] > 0:
                        left[m["payload"]] -= 1
                    else:
                        extra.append((h, m))
            for h in handles:
                c = self.consumers[h]
                c.cursor = len(c.received) if count is None or want_ids is not None or want_payloads is not None \
                    else c.cursor + sum(1 for hh, _ in window if hh == h)
            key_owner = self.key_owner.setdefault((self.consumers[handles[0]].topic,
                                                   self.consumers[handles[0]].subscription), {})
            owners_before = dict(key_owner)
            for h, m in window:
                if m["key"] is not None:
                    key_owner[m["key"]] = h
        detail = f"expected: {expected_text} at {', '.join(handles)}\narrived:  {self._show(window + extra)}"
        if only and extra:
            raise StepFailed(f"{len(extra)} unexpected message(s) arrived", detail)
        if order:
            for h in handles:
                ids = [m["id"] for hh, m in window if hh == h and (want_ids is None or m["id"] in want_ids)]
                if ids != sorted(ids):
                    raise StepFailed(f"out of order at {h}", detail)
                if want_payloads is not None and len(handles) == 1:
                    got = [m["payload"] for _, m in window]
                    if got != list(s["payloads"]):
                        raise StepFailed("payloads not in the expected order", detail)
        if "redelivered" in s.fields:
            flagged = s["redelivered"]
            wrong = [m["id"] for _, m in window if bool(m["redeliveries"]) != flagged]
            if wrong:
                raise StepFailed(f"ids {wrong} {'not ' if flagged else ''}flagged as redelivered", detail)
        if s.get("sticky_keys"):
            for h, m in window:
                prev = owners_before.get(m["key"])
                if prev is not None and prev != h and prev in self.consumers and \
                        not self.consumers[prev].gone and self.consumers[prev].closed is None:
                    raise StepFailed(f"key {m['key']!r} moved from {prev} (still attached) to {h}", detail)
        per = Counter(h for h, _ in window)
        return f"{len(window)} arrived ({', '.join(f'{h}: {n}' for h, n in per.items())})"

    def step_expect_active(self, s):
        c = self.consumer(s["consumer"])
        want = s["active"]
        try:
            self.wait_until(lambda: c.active == want, s.get("within", DEFAULT_WITHIN), f"active={want}")
        except StepFailed as exc:
            raise StepFailed(str(exc), f"expected: active={want}\narrived:  active={c.active}") from None
        return f"active={want}"

    def step_expect_closed(self, s):
        c = self.consumer(s["consumer"])
        reason = s.get("reason")
        try:
            self.wait_until(lambda: c.closed is not None and (reason is None or c.closed == reason),
                            s.get("within", DEFAULT_WITHIN), f"closed {reason or ''}")
        except StepFailed as exc:
            raise StepFailed(str(exc), f"expected: closed {reason or '(any reason)'}\n"
                                       f"arrived:  {c.closed or 'not closed'}") from None
        return f"closed: {c.closed}"

    def step_expect_lost(self, s):
        a = self.agent(s["client"])
        self.wait_until(lambda: a.lost is not None, s.get("within", DEFAULT_WITHIN),
                        f"client {a.name} to see its connection end")
        return f"lost: {a.lost}"

    def step_expect_stats(self, s):
        a = self.agent(s["client"])
        within = s.get("within", DEFAULT_WITHIN)
        deadline = time.monotonic() + within
        want = s["values"]
        while True:
            reply = a.request("stats", topic=s["topic"])
            got = self._stat_values(reply, s.get("subscription"), want)
            if got == want:
                return ", ".join(f"{k}={v}" for k, v in got.items())
            if time.monotonic() > deadline:
                raise StepFailed(f"stats did not match within {within:g}s",
                                 f"expected: {want}\narrived:  {got}")
            with self.cond:
                self.cond.wait(0.05)   # polling the broker: stats are only observable by query

    @staticmethod
    def _stat_values(reply, subscription, want):
        if not reply["ok"]:
            return {"error": reply.get("code")}
        stats = reply["stats"]
        target = stats
        if subscription is not None:
            subs = [x for x in stats.get("subscriptions", []) if x["name"] == subscription]
            target = subs[0] if subs else None
        got = {}
        for key in want:
            if key == "exists":
                got[key] = target is not None
            elif key == "consumer_count":   # a removed subscription has no consumer
                got[key] = len(target.get("consumers", [])) if target is not None else 0
            elif target is None:
                got[key] = None
            elif key == "consumer_names":
                got[key] = sorted(c["name"] for c in target.get("consumers", []))
            elif key == "active_consumer":
                act = [c["name"] for c in target.get("consumers", []) if c.get("active")]
                got[key] = act[0] if len(act) == 1 else act
            elif key == "subscription_names":
                got[key] = sorted(x["name"] for x in target.get("subscriptions", []))
            else:
                got[key] = target.get(key)
        return got

    def step_wait(self, s):
        from actorbroker.scripts.scenario.format import WAIT_AS
        return getattr(self, "step_" + WAIT_AS[s["until"]])(s)

    def step_pause(self, s):
        time.sleep(s["seconds"])
        return f"{s['seconds']}s"

    # --- churn ---------------------------------------------------------------------------------

    def step_churn(self, s):
        from actorbroker.scripts.scenario.churn import run_churn
        return run_churn(self, s)

    # --- running -------------------------------------------------------------------------------

    def run(self):
        sc = self.scenario
        self.say(f"scenario {sc.name} ({sc.path})")
        self.say(f"  {' '.join(sc.description.split())}")
        t_all = time.monotonic()
        try:
            if sc.start_broker:
                t = time.monotonic()
                try:
                    msg = self.start_broker([])
                    self.say(f"  [ 0] start broker {sc.broker_options or ''} ... ok {time.monotonic() - t:.2f}s  {msg}")
                except Exception as exc:
                    self.failure = (0, f"broker did not start: {exc}", "")
                    self.say(f"  [ 0] start broker ... FAILED: {exc}")
            if self.failure is None:
                for step in sc.steps:
                    if not self.run_step(step):
                        break
        except KeyboardInterrupt:
            self.failure = self.failure or (None, "interrupted", "")
            self.say("  interrupted")
            raise
        finally:
            tail = self.broker.log_tail() if self.broker else (self.brokers[-1].log_tail() if self.brokers else "")
            self.cleanup()
            elapsed = time.monotonic() - t_all
            passed = sum(1 for r in self.results if r[1])
            if self.failure:
                number, message, detail = self.failure
                self.say(f"  FAILED at step {number}: {message}")
                for line in detail.splitlines():
                    self.say(f"    {line}")
                if tail:
                    self.say("  broker log tail:")
                    for line in tail.splitlines():
                        self.say(f"    | {line}")
                self.say(f"  scenario {sc.name}: FAILED ({passed}/{len(sc.steps)} steps passed, {elapsed:.2f}s)")
                self.say(f"  work dir kept: {self.workdir}")
            else:
                self.say(f"  scenario {sc.name}: passed ({len(sc.steps)} steps, {elapsed:.2f}s)")
                if not self.keep:
                    shutil.rmtree(self.workdir, ignore_errors=True)
            self.elapsed = elapsed
        return self.failure is None

    def run_step(self, step):
        t = time.monotonic()
        with self.cond:
            before = len(self.violations)
        try:
            message = getattr(self, "step_" + step.action)(step) or ""
            with self.cond:
                new = self.violations[before:]
            if new:
                raise StepFailed(f"invariant violated: {new[0]}", "\n".join(new))
        except StepFailed as exc:
            dt = time.monotonic() - t
            self.results.append((step, False, dt, str(exc)))
            self.failure = (step.number, str(exc), exc.detail)
            self.say(f"  [{step.number:2}] {step.title()} ... FAILED {dt:.2f}s")
            return False
        except Exception as exc:
            dt = time.monotonic() - t
            self.results.append((step, False, dt, str(exc)))
            self.failure = (step.number, f"{type(exc).__name__}: {exc}", "")
            self.say(f"  [{step.number:2}] {step.title()} ... ERROR {dt:.2f}s")
            return False
        dt = time.monotonic() - t
        self.results.append((step, True, dt, message))
        self.say(f"  [{step.number:2}] {step.title()} ... ok {dt:.2f}s  {message}")
        return True

    def cleanup(self):
        """Stop every agent (by PID) and every broker this run started."""
        for a in self.all_agents:
            try:
                a.kill()
            except Exception:
                pass
            a.close_pipes()
        for b in self.brokers:
            try:
                if b.proc.poll() is None or any(proctree.alive(p) for p in b.processes()):
                    left = b.stop()
                    if left:
                        self.say(f"  warning: broker processes left: {left}")
            except Exception as exc:
                self.say(f"  warning: stopping the broker: {exc}")
            for f in (b.stderr, b.proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass
        self.brokers.clear()
        self.broker = None
        self.agent_stderr.close()


def run_file(path, out=None, keep=False):
    """Load and run one scenario file; returns the Runner (or raises ScenarioError)."""
    from actorbroker.scripts.scenario.format import load
    runner = Runner(load(path), out=out, keep=keep)
    runner.run()
    return runner
