"""Runs a scenario: a broker (LocalBroker), client agents (one OS process each), the steps in
order, invariants checked on every message that arrives; prints each step with its outcome and
time. Every process it starts is stopped by PID at the end, whatever happens."""
import json
import os
import queue
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
from actorbroker.scripts.scenario import events, tasks
from actorbroker.scripts.scenario.outcome import CLIENT_GONE, ScenarioSkipped, StepFailed

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_WITHIN = 10.0
REQUEST_TIMEOUT = 30.0
RUNNER_PID_ENV = "ACTORBROKER_SCENARIO_RUNNER_PID"   # the agent's parent, checked after its prctl


class _Spawner:
    """Starts every agent process from one thread that lives as long as this process.

    An agent asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and the kernel
    sends it when the *thread* that forked it ends, not the process: an agent started by a
    parallel group's thread or a background step's was killed as soon as that step ended. Started
    from here, agents die with the runner process, and only with it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pid = None          # the process the thread runs in (a forked child needs its own)
        self.jobs = None

    def popen(self, *args, **kwargs):
        with self.lock:
            if self.pid != os.getpid():
                self.jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self.jobs,), name="scenario-agent-spawner",
                                 daemon=True).start()
                self.pid = os.getpid()
            jobs = self.jobs
        done, box = threading.Event(), {}
        jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    @staticmethod
    def _serve(jobs):
        while True:
            args, kwargs, box, done = jobs.get()
            try:
                box["proc"] = subprocess.Popen(*args, **kwargs)
            except BaseException as exc:   # raised again in the thread that asked
                box["error"] = exc
            done.set()


_spawner = _Spawner()


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

    def __init__(self, runner, name, heartbeat_ms=None, reconnect_within=None):
        """reconnect_within: seconds the client keeps trying to reconnect (None: no reconnect)."""
        self.runner, self.name = runner, name
        host, port = runner.broker.address
        self.reconnecting = reconnect_within is not None
        self.proc = _spawner.popen(
            [sys.executable, "-m", "actorbroker.scripts.scenario.agent", host, str(port), name, str(heartbeat_ms or 0),
             str(reconnect_within or 0)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=runner.agent_stderr,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **{RUNNER_PID_ENV: str(os.getpid())}))
        self.pid = self.proc.pid
        self.replies = {}
        self.rids = 0
        self.ready = None            # the ready/fatal event
        self.lost = None             # reason, once the client saw its connection end (for good)
        self.lost_code = None        # the code of the broker's fatal error before that, if it sent one
        self.reconnects = 0          # times the client reconnected (reconnect = true)
        self.exited = False
        self.frozen = False
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        cond = self.runner.cond
        while True:
            try:
                line = self.proc.stdout.readline()
            except (ValueError, OSError):   # stdout closed under us (cleanup): the agent is gone
                break
            if not line:
                break
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
                    self.lost_code = ev.get("code")
                elif ev.get("event") == "reconnected":
                    self.reconnects += 1
                elif ev.get("event") == "receipted":
                    self.runner.on_receipted(ev)
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
            raise StepFailed(f"client {self.name} is not running", code=CLIENT_GONE) from None
        return rid

    def result(self, rid, timeout=REQUEST_TIMEOUT, what="reply"):
        self.runner.wait_until(lambda: rid in self.replies or self.exited, timeout,
                               f"client {self.name} to answer ({what})")
        if rid not in self.replies:
            raise StepFailed(f"client {self.name} exited before answering ({what})", code=CLIENT_GONE)
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
        """After kill(): its reader reads to the EOF first (closing stdout under a reader that is
        still in a read made it die with "ValueError: PyMemoryView_FromBuffer(): info->buf must
        not be NULL", a traceback in the middle of the runner's output)."""
        if self.reader is not threading.current_thread():
            self.reader.join(5)
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
        self.producing = {}             # producer handle -> `as` of its produce step running now
        self.tasks = {}                 # background step's task name -> tasks.Task
        self.watcher = None             # events.Watcher of the `watch` step
        self.skipped = None             # why the scenario cannot run on this broker
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
            # seen: unflagged deliveries of each id. Only a second unflagged one is a duplicate: a
            # flagged redelivery (0 here) may be read first, each client having its own pipe
            seen = self.seen.setdefault((c.topic, c.subscription), {})
            if ev["redeliveries"] == 0:
                if seen.get(ev["id"], 0):
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

    def on_receipted(self, ev):
        """Receipts of a produce step as they come (under self.cond): its `as` names them at once,
        so that a producer killed in the middle leaves the ids it had receipts for."""
        label = self.producing.get(ev["handle"])
        if label is not None:
            self.labels.setdefault(label, []).extend(tuple(x) for x in ev["sent"])

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

    @staticmethod
    def refused(s, reply, what):
        """A reply against the step's `expect_error`: None when it succeeded as it should (go on),
        the step's message when it was refused as expected; raises otherwise."""
        expected = s.get("expect_error")
        if reply["ok"]:
            if expected:
                raise StepFailed(f"{what} succeeded, expected {expected}", f"expected: {expected}\narrived:  ok")
            return None
        code = reply.get("code")
        if expected and code == expected:
            return f"refused with {code}, as expected"
        raise StepFailed(f"{what} refused: {reply.get('error')}",
                         f"expected: {expected or 'success'}\narrived:  {code}", code=code)

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

    def start_broker(self, options, port=None):
        """port: the port of the broker before (a restart), so that reconnecting clients find it."""
        opts = list(self.scenario.broker_options) + list(options or []) + (["--port", str(port)] if port else [])
        t = time.monotonic()
        self.broker = LocalBroker(self.data_dir, *opts)
        self.brokers.append(self.broker)
        self.last_port = self.broker.port
        self.seen.clear()   # after a (re)start, unacknowledged messages may come again unflagged
        return f"broker on {self.broker.host}:{self.broker.port} in {time.monotonic() - t:.2f}s"

    def broker_gone(self):
        """Clients of a stopped broker lose their connection; their consumers are gone, except
        those of clients that reconnect (they subscribe again by themselves)."""
        self.broker = None
        for c in self.consumers.values():
            agent = self.agents.get(c.client)
            if agent is None or not agent.reconnecting:
                c.gone = True

    # --- steps ---------------------------------------------------------------------------------

    def step_start(self, s):
        if self.broker is not None:
            raise StepFailed("the broker is already running")
        # on the port of the broker before it (stop, kill9): clients that reconnect find it there
        return self.within_limit(s, lambda: self.start_broker(s.get("options"), getattr(self, "last_port", None)))

    @staticmethod
    def within_limit(s, action):
        """Run action(); the step fails if it took longer than its `within` (if given)."""
        t = time.monotonic()
        message = action()
        took = time.monotonic() - t
        if "within" in s.fields and took > s["within"]:
            raise StepFailed(f"took {took:.2f}s, more than within = {s['within']:g}s", message)
        return message

    def step_stop(self, s):
        return self.within_limit(s, lambda: self._stop(s))

    def _stop(self, s):
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
        def restart():
            port = self.broker.port if self.broker is not None else None
            self.step_kill9(s) if s.get("kill") else self._stop(s)
            return self.start_broker(s.get("options"), port)
        return self.within_limit(s, restart)

    step_restart_broker = step_restart

    def step_open(self, s):
        self.need_broker()
        name = s["client"]
        old = self.agents.get(name)
        if old is not None and old.proc.poll() is None:
            raise StepFailed(f"client {name!r} is already open")
        reconnect = s.get("reconnect_within", 30) if s.get("reconnect") else None
        a = AgentProcess(self, name, s.get("heartbeat_ms"), reconnect)
        self.agents[name] = a
        self.all_agents.append(a)
        a.wait_ready()
        again = f", reconnects for {reconnect:g}s" if reconnect else ""
        return f"pid {a.pid}, heartbeat {a.ready.get('heartbeat_ms')} ms{again}"

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

    def step_flood(self, s):
        a = self.agent(s["client"])
        within = s.get("within", DEFAULT_WITHIN)
        reply = a.request("flood", timeout=within + 10, within=within, bytes=s.get("bytes", 32 * 1024 * 1024))
        if not reply["ok"]:
            raise StepFailed(f"flood failed: {reply['error']}")
        return f"{reply['sent_bytes']:,} bytes of pings written without reading"

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
        if (message := self.refused(s, reply, "producer")) is not None:
            return message
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
        self.produced[handle] += count
        with self.cond:
            if s.get("as"):
                self.labels[s["as"]] = []
                self.producing[handle] = s["as"]
        try:
            reply = a.request("produce", timeout=within + 5, handle=handle, count=count,
                              payload=s.get("payload", handle + "-{i}"), keys=s.get("keys"),
                              attrs=s.get("attrs"), rate=rate, start=start, within=within)
        except StepFailed as exc:   # the client ended: the label keeps what was receipted before
            return self._produce_refused(s, exc.code, str(exc), len(self.labels.get(s.get("as"), [])))
        finally:
            with self.cond:
                self.producing.pop(handle, None)
        if not reply["ok"]:
            return self._produce_refused(s, reply.get("code"), reply.get("error"), 0)
        sent = [tuple(x) for x in reply["sent"]]
        if s.get("as"):
            with self.cond:
                self.labels[s["as"]] = sent
        if reply.get("error") or len(sent) != count:
            return self._produce_refused(s, reply.get("code"), reply.get("error"), len(sent))
        if s.get("expect_error"):
            raise StepFailed(f"all {count} receipted, expected {s['expect_error']}",
                             f"expected: {s['expect_error']}\narrived:  ok")
        return f"{count} receipted, ids {sent[0][0]}..{sent[-1][0]}"

    def _produce_refused(self, s, code, error, receipted):
        if s.get("expect_error") and code == s["expect_error"]:
            return f"{receipted} of {s['count']} receipted, then {code}, as expected"
        raise StepFailed(f"{receipted} of {s['count']} messages got a receipt: {error}",
                         f"expected: {s.get('expect_error') or 'every receipt'}\narrived:  {code}", code=code)

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
        if not reply["ok"]:
            with self.cond:
                del self.consumers[handle]
                if old is not None:
                    self.consumers[handle] = old
        if (message := self.refused(s, reply, "subscribe")) is not None:
            return message
        state.id = reply["consumer"]
        return f"consumer id {state.id} ({reply['dispatch']})"

    def step_flow(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("flow", handle=c.handle, credits=s["credits"])
        if (message := self.refused(s, reply, "flow")) is not None:
            return message
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
        if (message := self.refused(s, reply, op)) is not None:
            return message
        return f"{op}ed {len(reply['ids'])} ids"

    def step_ack(self, s):
        return self._settle(s, "ack")

    def step_nack(self, s):
        return self._settle(s, "nack")

    def step_close_consumer(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("close_consumer", handle=c.handle)
        if (message := self.refused(s, reply, "close_consumer")) is not None:
            return message
        c.gone = True
        return "closed"

    def step_close_producer(self, s):
        handle = s["producer"]
        if handle not in self.producers:
            raise StepFailed(f"no producer {handle!r}")
        reply = self.agent(self.producers[handle][0]).request("close_producer", handle=handle)
        if (message := self.refused(s, reply, "close_producer")) is not None:
            return message
        return "closed"

    def step_unsubscribe(self, s):
        c = self.consumer(s["consumer"])
        reply = self.agent(c.client).request("unsubscribe", handle=c.handle)
        if (message := self.refused(s, reply, "unsubscribe")) is not None:
            return message
        c.gone = True
        with self.cond:
            self.seen.pop((c.topic, c.subscription), None)
        return "unsubscribed"

    # --- expectations --------------------------------------------------------------------------

    def _attached(self, handle):
        """The consumer is still attached, as far as the runner knows (not closed, its client not
        closed, killed or lost)."""
        c = self.consumers.get(handle)
        return c is not None and not c.gone and c.closed is None

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
            arrived = self._show(window)   # every message once, before the split below
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
            for h in handles if not s.get("keep") else ():   # keep: the next expect sees them too
                c = self.consumers[h]
                c.cursor = len(c.received) if count is None or want_ids is not None or want_payloads is not None \
                    else c.cursor + sum(1 for hh, _ in window if hh == h)
            key_owner = self.key_owner.setdefault((self.consumers[handles[0]].topic,
                                                   self.consumers[handles[0]].subscription), {})
            owners_before = dict(key_owner)
            takers = {}                          # key -> the consumers it went to in this window
            for h, m in window:
                if m["key"] is not None and h not in takers.setdefault(m["key"], []):
                    takers[m["key"]].append(h)
            for key, hs in takers.items():       # its owner now: the one still attached, if one is
                live = [h for h in hs if self._attached(h)]
                key_owner[key] = live[-1] if len(live) == 1 else hs[-1]
        detail = f"expected: {expected_text} at {', '.join(handles)}\narrived:  {arrived}"
        if only and extra:
            raise StepFailed(f"{len(extra)} unexpected message(s) arrived", detail)
        if order:
            for h in handles:
                ids = [m["id"] for hh, m in window if hh == h and (want_ids is None or m["id"] in want_ids)]
                if ids != sorted(ids):
                    raise StepFailed(f"out of order at {h}", detail)
                if want_payloads is not None and len(handles) == 1:
                    # in that order; with only = false, others may come between them
                    got = iter(m["payload"] for _, m in window)
                    if not all(any(p == g for g in got) for p in s["payloads"]):
                        raise StepFailed("payloads not in the expected order", detail)
        if "redelivered" in s.fields:
            flagged = s["redelivered"]
            wrong = [m["id"] for _, m in window if bool(m["redeliveries"]) != flagged]
            if wrong:
                raise StepFailed(f"ids {wrong} {'not ' if flagged else ''}flagged as redelivered", detail)
        if s.get("sticky_keys"):
            for key, hs in takers.items():
                live = [h for h in hs if self._attached(h)]
                if len(live) > 1:     # within this window: split between consumers both attached
                    raise StepFailed(f"key {key!r} went to {' and '.join(live)}, both still attached", detail)
                prev = owners_before.get(key)
                moved = [h for h in hs if h != prev]
                if prev is not None and moved and self._attached(prev):
                    raise StepFailed(f"key {key!r} moved from {prev} (still attached) to {moved[0]}", detail)
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
        """`consumer` closed; or of `consumers`, `count` (default all) closed, the others not."""
        handles = s.get("consumers") or [s["consumer"]]
        states = [self.consumer(h) for h in handles]
        count = s.get("count", len(states))
        reason = s.get("reason")

        def closed():
            return [c for c in states if c.closed is not None and (reason is None or c.closed == reason)]

        def arrived():
            return ", ".join(f"{c.handle}: {c.closed or 'not closed'}" for c in states)
        try:
            self.wait_until(lambda: len(closed()) >= count, s.get("within", DEFAULT_WITHIN),
                            f"{count} of {', '.join(handles)} closed {reason or ''}")
        except StepFailed as exc:
            raise StepFailed(str(exc), f"expected: {count} closed {reason or '(any reason)'}\n"
                                       f"arrived:  {arrived()}") from None
        with self.cond:
            if len(closed()) != count or any(c.closed is not None for c in states if c not in closed()):
                raise StepFailed(f"more than {count} closed", f"expected: {count} closed {reason or ''}\n"
                                                             f"arrived:  {arrived()}")
            return "closed: " + arrived()

    def step_expect_reconnected(self, s):
        a = self.agent(s["client"])
        times = s.get("times", 1)
        try:
            self.wait_until(lambda: a.reconnects >= times or a.lost is not None, s.get("within", DEFAULT_WITHIN),
                            f"client {a.name} to reconnect {times} time(s)")
        except StepFailed as exc:
            raise StepFailed(str(exc), f"expected: {times} reconnect(s)\narrived:  {a.reconnects}") from None
        if a.reconnects < times:
            raise StepFailed(f"client {a.name} gave up reconnecting: {a.lost}")
        return f"reconnected {a.reconnects} time(s)"

    def step_expect_lost(self, s):
        a = self.agent(s["client"])
        try:
            self.wait_until(lambda: a.lost is not None, s.get("within", DEFAULT_WITHIN),
                            f"client {a.name} to see its connection end")
        except StepFailed as exc:
            raise StepFailed(str(exc), f"expected: the connection of client {a.name} ended"
                                       f"{' with ' + s['code'] if s.get('code') else ''}\n"
                                       f"arrived:  still connected") from None
        if s.get("code") and s["code"] != a.lost_code:   # the whole code: CONSUMER is not SLOW_CONSUMER
            raise StepFailed(f"the connection ended without {s['code']}",
                             f"expected: {s['code']}\narrived:  {a.lost_code or 'no error code'}: {a.lost}")
        return f"lost: {a.lost}"

    def step_expect_stats(self, s):
        a = self.agent(s["client"])
        within = s.get("within", DEFAULT_WITHIN)
        deadline = time.monotonic() + within
        want = s["values"]
        while True:
            reply = a.request("stats", topic=s["topic"])
            got = self._stat_values(reply, s.get("subscription"), want, self._consumer_name(s))
            if got == want:
                return ", ".join(f"{k}={v}" for k, v in got.items())
            if time.monotonic() > deadline:
                raise StepFailed(f"stats did not match within {within:g}s",
                                 f"expected: {want}\narrived:  {got}")
            with self.cond:
                self.cond.wait(0.05)   # polling the broker: stats are only observable by query

    def _consumer_name(self, s):
        """The consumer an expect_stats looks at: a handle's broker name, or a name as given."""
        if "consumer" not in s.fields:
            return None
        c = self.consumers.get(s["consumer"])
        return c.name if c is not None else s["consumer"]

    @staticmethod
    def _stat_values(reply, subscription, want, consumer=None):
        if not reply["ok"]:
            return {"error": reply.get("code")}
        stats = reply["stats"]
        target = stats
        if subscription is not None:
            subs = [x for x in stats.get("subscriptions", []) if x["name"] == subscription]
            target = subs[0] if subs else None
        if consumer is not None and target is not None:   # that consumer's entry (unacked, credits, active, ...)
            entries = [c for c in target.get("consumers", []) if c["name"] == consumer]
            target = entries[0] if entries else None
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
        if "task" in s.fields:
            return tasks.wait_task(self, s)
        return getattr(self, "step_" + WAIT_AS[s["until"]])(s)

    def step_parallel(self, s):
        return tasks.run_parallel(self, s)

    def step_watch(self, s):
        return events.start_watch(self, s)

    def step_expect_events(self, s):
        return events.expect_events(self, s)

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
                    self.failure = (0, str(exc), "")
                    self.say(f"  [ 0] start broker ... FAILED: {exc}")
            if self.failure is None:
                for step in sc.steps:
                    if not self.run_step(step) or not tasks.all_well(self):
                        break
                else:
                    tasks.finish(self)
        except KeyboardInterrupt:
            self.failure = self.failure or (None, "interrupted", "")
            self.say("  interrupted")
            raise
        finally:
            tail = self.broker.log_tail() if self.broker else (self.brokers[-1].log_tail() if self.brokers else "")
            self.cleanup()
            elapsed = time.monotonic() - t_all
            passed = sum(1 for r in self.results if r[1])
            if self.skipped and not self.failure:
                self.say(f"  scenario {sc.name}: SKIPPED: {self.skipped}")
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.failure:
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
                if self.keep:
                    self.say(f"  work dir kept: {self.workdir}")
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)
            self.elapsed = elapsed
        return self.failure is None

    def execute(self, step):
        """Run one step: (message, None) or (None, StepFailed); never raises but ScenarioSkipped."""
        with self.cond:
            before = len(self.violations)
        try:
            message = getattr(self, "step_" + step.action)(step) or ""
            with self.cond:
                new = self.violations[before:]
            if new:
                raise StepFailed(f"invariant violated: {new[0]}", "\n".join(new))
            return message, None
        except StepFailed as exc:
            return None, exc
        except ScenarioSkipped:
            raise
        except Exception as exc:
            return None, StepFailed(f"{type(exc).__name__}: {exc}", code="ERROR")

    def run_step(self, step):
        if step.get("background"):
            return tasks.start_background(self, step)
        t = time.monotonic()
        try:
            message, failed = self.execute(step)
        except ScenarioSkipped as exc:
            self.skipped = str(exc)
            self.say(f"  [{step.number:2}] {step.title()} ... skipped: {exc}")
            return False
        return self.record(step, time.monotonic() - t, message, failed)

    def record(self, step, dt, message, failed, where=""):
        """Print and keep a step's outcome; a failure is the scenario's (the first one wins)."""
        with self.cond:
            if failed is None:
                self.results.append((step, True, dt, message))
                self.say(f"  [{step.number:2}] {step.title()}{where} ... ok {dt:.2f}s  {message}")
                return True
            self.results.append((step, False, dt, str(failed)))
            if self.failure is None:
                self.failure = (step.number, str(failed), failed.detail)
            word = "ERROR" if failed.code == "ERROR" else "FAILED"
            self.say(f"  [{step.number:2}] {step.title()}{where} ... {word} {dt:.2f}s")
            return False

    def cleanup(self):
        """Stop every agent (by PID) and every broker this run started, and the watcher."""
        if self.watcher is not None:
            self.watcher.close()
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
        tasks.join_all(self)   # their clients and broker are gone: they end now
        self.agent_stderr.close()


def run_file(path, out=None, keep=False):
    """Load and run one scenario file; returns the Runner (or raises ScenarioError)."""
    from actorbroker.scripts.scenario.format import load
    runner = Runner(load(path), out=out, keep=keep)
    runner.run()
    return runner
