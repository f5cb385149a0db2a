"""Fencing of a reliable topic's log in a folder that several nodes share (`serve --shared-data`).

Only one node at a time may write a topic's log: the one that holds its latest *epoch*. The
shared folder itself is the arbiter, so that no vote or lease server is needed:

    <topic dir>/epochs/000000000007.claim   {"node", "incarnation"}: created with O_EXCL, so
                                             of two nodes claiming epoch 7 at once one wins
    <topic dir>/epochs/000000000007.start   {"start": offset}: where epoch 7's records begin,
                                             written after its claim, once it has read the log

Taking a topic over: claim epoch N+1 first, then read the log (its end is epoch N+1's start),
then write `.start`. Epoch N's segment files are read only below that start: whatever its
writer adds afterwards is ignored. The writer of epoch N checks, after each fsync and before it
sends a receipt, that no claim of N+1 exists (`Epoch.taken`). Why nothing receipted is lost: if
that check found no claim, the claim came after the fsync, so the new owner's read, which comes
after its claim, sees the record; if it found one, the writer refuses the send (the producer gets
an error, never a receipt).

This needs a folder whose O_EXCL create is atomic and whose metadata every node sees at once (a
local disk shared by network namespaces, or a cluster file system with those guarantees; NFS
before v4 gives neither).
"""
import json
import os

EPOCHS = "epochs"
CLAIM = ".claim"
START = ".start"


class Fenced(Exception):
    """Another node holds the topic's latest epoch (`owner`); this one may not open its log."""

    def __init__(self, owner, epoch):
        super().__init__(f"node {owner or '(single broker)'} holds epoch {epoch} of this topic's log")
        self.owner = owner
        self.epoch = epoch


def _name(epoch, suffix):
    return f"{epoch:012d}{suffix}"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claimed(topic_dir):
    """The claimed epochs, ascending."""
    folder = os.path.join(topic_dir, EPOCHS)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-len(CLAIM)]) for n in names if n.endswith(CLAIM) and n[:-len(CLAIM)].isdigit())


def read_claim(topic_dir, epoch):
    """{"node", "incarnation"} of a claim; an unreadable one (its writer died before writing it)
    names no node."""
    try:
        with open(os.path.join(topic_dir, EPOCHS, _name(epoch, CLAIM))) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def latest_owner(topic_dir):
    """The node holding the latest epoch ("" for none, or an unreadable claim); None: no epoch
    was ever claimed."""
    epochs = claimed(topic_dir)
    return read_claim(topic_dir, epochs[-1]).get("node", "") if epochs else None


def starts(topic_dir):
    """{epoch: first offset of its records} of the epochs that began writing."""
    folder = os.path.join(topic_dir, EPOCHS)
    found = {}
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return found
    for n in names:
        if n.endswith(START) and n[:-len(START)].isdigit():
            try:
                with open(os.path.join(folder, n)) as f:
                    found[int(n[:-len(START)])] = int(json.load(f)["start"])
            except (OSError, ValueError, KeyError, TypeError):
                continue   # never written whole: that epoch wrote nothing
    return found


def limits(topic_dir):
    """{epoch: offset its records end before}: the start of the next epoch that began writing.
    An epoch missing here (the latest, or one superseded before it wrote) has no limit."""
    begun = starts(topic_dir)
    ordered = sorted(begun)
    out = {}
    for epoch in claimed(topic_dir) + [0]:
        later = [begun[e] for e in ordered if e > epoch]
        if later:
            out[epoch] = later[0]
    return out


class Epoch:
    """This node's claim on a topic's log: `taken()` says whether a later epoch was claimed."""

    def __init__(self, topic_dir, epoch, node):
        self.topic_dir = topic_dir
        self.number = epoch
        self.node = node
        self._next = os.path.join(topic_dir, EPOCHS, _name(epoch + 1, CLAIM))

    def taken(self):
        """The node that claimed the next epoch (fenced: write nothing more), or None."""
        if not os.path.exists(self._next):
            return None
        return read_claim(self.topic_dir, self.number + 1).get("node", "")

    def begin(self, start):
        """Record where this epoch's records start (after the log was read to its end)."""
        folder = os.path.join(self.topic_dir, EPOCHS)
        path = os.path.join(folder, _name(self.number, START))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"start": start}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)


def claim(topic_dir, node, incarnation, live=None):
    """Claim the next epoch of the topic's log for `node`. Allowed when no epoch exists, when
    `node` holds the latest, or (a takeover) when its holder is not in `live` (the nodes this
    node sees live; None: every other node counts as live). Raises Fenced otherwise, or when
    another node claims the same epoch first."""
    folder = os.path.join(topic_dir, EPOCHS)
    os.makedirs(folder, exist_ok=True)
    epochs = claimed(topic_dir)
    latest = epochs[-1] if epochs else 0
    if epochs:
        owner = read_claim(topic_dir, latest).get("node", "")
        if owner != node and (live is None or owner in live):
            raise Fenced(owner, latest)
    path = os.path.join(folder, _name(latest + 1, CLAIM))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Fenced(read_claim(topic_dir, latest + 1).get("node", ""), latest + 1) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"node": node, "incarnation": incarnation}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)
    return Epoch(topic_dir, latest + 1, node)
