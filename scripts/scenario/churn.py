"""The `churn` step: consumers attach, detach cleanly and are killed (-9) at random, from a seed,
while a producer publishes (with min_consumers = max_consumers each event replaces one: it
leaves, a new one attaches); the runner's invariants are checked on every delivery (credits
never exceeded, no duplicate without the redelivery flag) and, on a reliable topic, at the end
every receipted message must have been delivered (none lost).

The random choices depend only on the seed and the step's fields, so a failing run is replayed
with the same seed (the timing of the broker and of the processes still varies)."""
import random
import time

from actorbroker.scripts.scenario.runner import AgentProcess, ConsumerState, StepFailed


def run_churn(runner, s):
    runner.need_broker()
    rng = random.Random(s["seed"])
    topic, subscription, sub_type = s["topic"], s["subscription"], s["type"]
    dispatch = s.get("dispatch", "reliable")
    duration, rate = s["duration"], s["rate"]
    produce_rate = s.get("produce_rate", 50)
    keys = [f"k{i}" for i in range(s["keys"])] if s.get("keys") else None
    min_c, max_c = s.get("min_consumers", 1), s.get("max_consumers", 4)
    queue = s.get("receiver_queue", 10)
    heartbeat = s.get("heartbeat_ms")
    kill_share = s.get("kill_share", 0.5)
    tag = f"churn{s.number}"
    live = []            # (client name, consumer handle)
    counts = {"attach": 0, "detach": 0, "kill": 0}
    serial = [0]

    def attach():
        serial[0] += 1
        k = serial[0]
        client, handle = f"{tag}-client-{k}", f"{tag}-c{k}"
        a = AgentProcess(runner, client, heartbeat)
        runner.agents[client] = a
        runner.all_agents.append(a)
        a.wait_ready()
        state = ConsumerState(handle=handle, client=client, name=f"{tag}-consumer-{k}", topic=topic,
                              subscription=subscription, type=sub_type)
        with runner.cond:
            runner.consumers[handle] = state
        reply = a.request("subscribe", handle=handle, topic=topic, subscription=subscription,
                          type=sub_type, consumer=state.name, dispatch=dispatch, start="earliest",
                          receiver_queue=queue, credits="auto")
        if not reply["ok"]:
            raise StepFailed(f"churn: subscribe of {handle} refused: {reply['error']}")
        state.id = reply["consumer"]
        live.append((client, handle))
        counts["attach"] += 1

    def detach(kill):
        client, handle = live.pop(rng.randrange(len(live)))
        a = runner.agents.pop(client)
        if kill:
            a.kill()
            counts["kill"] += 1
        else:
            a.request("close")
            a.proc.wait(10)
            counts["detach"] += 1
        runner.consumers[handle].gone = True

    for _ in range(min_c):
        attach()
    # the producer, in its own client process, publishing in the background for the duration
    pclient = f"{tag}-producer"
    pa = AgentProcess(runner, pclient)
    runner.agents[pclient] = pa
    runner.all_agents.append(pa)
    pa.wait_ready()
    reply = pa.request("producer", handle=pclient, topic=topic, dispatch=dispatch)
    if not reply["ok"]:
        raise StepFailed(f"churn: producer refused: {reply['error']}")
    total = max(1, int(produce_rate * duration))
    produce_rid = pa.send("produce", handle=pclient, count=total, payload=f"{tag}-{{i}}", keys=keys,
                          rate=produce_rate, start=0, within=duration + 30)

    t0 = time.monotonic()
    n_events = int(duration * rate)
    for i in range(n_events):
        due = t0 + (i + 1) / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)    # the churn's own schedule, not a wait for the broker
        choices = []
        if len(live) < max_c:
            choices.append("attach")
        if len(live) > min_c:
            choices.append("leave")
        # min_consumers = max_consumers: neither is allowed, each event replaces one consumer
        what = rng.choice(choices) if choices else "replace"
        if what == "attach":
            attach()
        else:
            detach(kill=rng.random() < kill_share)
            if what == "replace":
                attach()
        with runner.cond:
            if runner.violations:
                raise StepFailed(f"invariant violated during churn: {runner.violations[0]}",
                                 "\n".join(runner.violations))

    reply = pa.result(produce_rid, timeout=duration + 60, what="produce")
    if not reply["ok"] or reply.get("error"):
        raise StepFailed(f"churn: producing failed: {reply.get('error')}")
    receipted = {x[0] for x in reply["sent"]}
    drain = s.get("drain_within", 20)
    key = (topic, subscription)
    if dispatch == "reliable":
        try:
            runner.wait_until(lambda: receipted <= set(runner.seen.get(key, {})), drain,
                              "every receipted message to be delivered")
        except StepFailed:
            with runner.cond:
                lost = sorted(receipted - set(runner.seen.get(key, {})))
            raise StepFailed(f"{len(lost)} receipted message(s) never delivered (lost)",
                             f"expected: all {len(receipted)} receipted ids\n"
                             f"missing:  {lost[:50]}{' ...' if len(lost) > 50 else ''}") from None
    with runner.cond:
        deliveries = [m for h, c in runner.consumers.items() if h.startswith(tag + "-c") for m in c.received]
    redelivered = sum(1 for m in deliveries if m["redeliveries"])
    got = len({m["id"] for m in deliveries})
    return (f"{counts['attach']} attach, {counts['detach']} clean detach, {counts['kill']} kill -9; "
            f"{len(receipted)} receipted, {got} distinct delivered, {len(deliveries)} deliveries "
            f"({redelivered} flagged redeliveries)")
