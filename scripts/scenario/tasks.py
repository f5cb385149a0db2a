"""Concurrent steps: `background = true` (the step runs in a thread while the next steps go on,
named by `task`), `wait` with `task` (for a background step to end), and `parallel` groups (their
steps start together, released by one barrier, so that two requests leave at the same instant).

A background step's outcome is printed when it ends; its failure is the scenario's, noticed at
the next step boundary (or by the `wait` for it). Every background step must have ended by the
end of the scenario."""
import threading
import time

from actorbroker.scripts.scenario.outcome import ScenarioSkipped, StepFailed

END_WAIT = 30.0        # seconds a background step still running at the end is given
BARRIER_WAIT = 30.0


class Task:
    def __init__(self, step, name):
        self.step, self.name = step, name
        self.message, self.failed = None, None
        self.done = threading.Event()
        self.thread = None


def _outcome(runner, step):
    """(message, failure) of a step run off the main thread: a skip there is a failure."""
    try:
        return runner.execute(step)
    except ScenarioSkipped as exc:
        return None, StepFailed(f"cannot run here: {exc}")


def start_background(runner, step):
    name = step.get("task", f"step{step.number}")
    old = runner.tasks.get(name)
    if old is not None and not old.done.is_set():
        return runner.record(step, 0.0, None, StepFailed(f"task {name!r} is still running"))
    task = runner.tasks[name] = Task(step, name)

    def run():
        t = time.monotonic()
        task.message, task.failed = _outcome(runner, step)
        runner.record(step, time.monotonic() - t, task.message, task.failed, f" (background task {name})")
        task.done.set()
        with runner.cond:
            runner.cond.notify_all()

    task.thread = threading.Thread(target=run, name=f"task-{name}", daemon=True)
    runner.say(f"  [{step.number:2}] {step.title()} ... started in the background (task {name})")
    task.thread.start()
    return True


def wait_task(runner, s):
    task = runner.tasks.get(s["task"])
    if task is None:
        raise StepFailed(f"no background step with task = {s['task']!r} has started")
    within = s.get("within", END_WAIT)
    if not task.done.wait(within):
        raise StepFailed(f"task {task.name} still running after {within:g}s")
    if task.failed is not None:
        raise StepFailed(f"task {task.name} failed: {task.failed}", task.failed.detail, task.failed.code)
    return f"task {task.name}: {task.message}"


def run_parallel(runner, s):
    """Every step of the group at once; each may be refused as its `expect_error` says, and
    `refused = N` with `refused_with = CODE` allows exactly N of them (whichever) to be refused
    with CODE: the outcome of a race."""
    steps = s["steps"]
    barrier = threading.Barrier(len(steps))
    outcomes = [None] * len(steps)

    def run(i, step):
        try:
            barrier.wait(BARRIER_WAIT)
        except threading.BrokenBarrierError:
            outcomes[i] = (None, StepFailed("the group did not start together"))
            return
        outcomes[i] = _outcome(runner, step)

    threads = [threading.Thread(target=run, args=(i, step), daemon=True) for i, step in enumerate(steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [f"{step.title()}: " + (message if failed is None else f"{failed.code or 'failed'}: {failed}")
             for step, (message, failed) in zip(steps, outcomes)]
    detail = "\n".join(lines)
    failures = [failed for _, failed in outcomes if failed is not None]
    allowed = s.get("refused", 0)
    code = s.get("refused_with")
    wrong = [f for f in failures if f.code != code]
    if wrong or len(failures) != allowed:
        raise StepFailed(f"{len(failures)} of {len(steps)} refused (expected {allowed}"
                         f"{' with ' + code if code else ''})", detail)
    return f"{len(steps)} at once; " + "; ".join(
        "ok" if failed is None else f"refused with {failed.code}" for _, failed in outcomes)


def all_well(runner):
    """No background step failed so far."""
    return runner.failure is None


def finish(runner):
    """At the end: every background step ends (briefly waited for), else the scenario fails."""
    for task in list(runner.tasks.values()):
        if not task.done.wait(END_WAIT) and runner.failure is None:
            runner.failure = (task.step.number, f"background task {task.name} still running at the end "
                                                f"(add a `wait` with task = {task.name!r})", "")


def join_all(runner):
    for task in runner.tasks.values():
        if task.thread is not None:
            task.thread.join(5)
