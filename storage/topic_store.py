"""A reliable topic's directory: its log, its metadata and its subscriptions' cursors.

    <data>/topics/<digest of topic name>/topic.json           {"name", "dispatch"}
    <data>/topics/<digest of topic name>/log/*.log             the SegmentLog
    <data>/topics/<digest of topic name>/cursors/<digest>.json one per durable subscription,
                                                               {"name", ...}

A digest is the SHA-256 of the name's UTF-8, in hex: 64 characters whatever the name (names
reach 255 bytes; a file name may not be longer than 255), and no name ('.', '..', '/') can
escape the data folder. The real names are in the files. Cursor files are replaced atomically
(write, fsync, rename).

Data written by earlier versions named both by the hex of the name (too long from 128
characters on); such a topic directory and its cursor files are renamed when the topic opens.
"""
import hashlib
import json
import logging
import os
import shutil

from actorbroker.storage import fencing
from actorbroker.storage.segment_log import SegmentLog

log = logging.getLogger("actorbroker.storage")


def topics_root(data_dir):
    return os.path.join(data_dir, "topics")


def digest(name):
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def topic_dir(data_dir, name):
    return os.path.join(topics_root(data_dir), digest(name))


def _legacy_topic_dir(data_dir, name):
    return os.path.join(topics_root(data_dir), name.encode().hex())


def stored_topics(data_dir, owner=None):
    """[(name, dispatch)] of the topics kept on disk; with `owner` (a shared folder), only those
    whose latest epoch that node holds (storage/fencing.py)."""
    found = {}
    root = topics_root(data_dir)
    if not os.path.isdir(root):
        return []
    for entry in sorted(os.listdir(root)):
        if owner is not None and fencing.latest_owner(os.path.join(root, entry)) not in (owner, None):
            continue
        path = os.path.join(root, entry, "topic.json")
        try:
            with open(path) as f:
                meta = json.load(f)
            found.setdefault(meta["name"], meta["dispatch"])   # once, whatever the layout
        except FileNotFoundError:
            continue   # (a topic being created or deleted)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # its name is only in there: the topic cannot be opened, and must not vanish unseen
            log.error("topic directory %s: %s is damaged (%s: %s); that topic is not opened and its "
                      "data stays on disk", entry, path, type(exc).__name__, exc)
    return list(found.items())


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _migrate_topic_dir(data_dir, name):
    """An earlier version's directory of this topic takes the digest's name (atomic rename)."""
    new = topic_dir(data_dir, name)
    if os.path.exists(new):
        return
    try:
        legacy = _legacy_topic_dir(data_dir, name)
        if os.path.isdir(legacy):
            os.rename(legacy, new)
            log.info("topic %s: data directory renamed to the digest layout", name)
    except OSError as exc:   # ENAMETOOLONG: there never was one
        log.debug("topic %s: no earlier data directory (%s)", name, exc)


class TopicStore:
    def __init__(self, data_dir, name, dispatch, segment_bytes, claim=None):
        """`claim` (node, incarnation, live nodes or None) only in a folder several nodes share:
        the next epoch of the log is claimed before it is read (storage/fencing.py); raises
        fencing.Fenced when another node holds it."""
        _migrate_topic_dir(data_dir, name)
        self.directory = topic_dir(data_dir, name)
        self.epoch = None
        os.makedirs(self.directory, exist_ok=True)
        if claim is not None:
            self.epoch = fencing.claim(self.directory, *claim)
        self.cursor_dir = os.path.join(self.directory, "cursors")
        os.makedirs(self.cursor_dir, exist_ok=True)
        self._migrate_cursors()
        meta = os.path.join(self.directory, "topic.json")
        if not os.path.exists(meta):
            _write_atomic(meta, json.dumps({"name": name, "dispatch": dispatch}))
        if self.epoch is None:
            self.log = SegmentLog(os.path.join(self.directory, "log"), segment_bytes, topic=name)
        else:
            self.log = SegmentLog(os.path.join(self.directory, "log"), segment_bytes,
                                  self.epoch.number, fencing.limits(self.directory), topic=name)
        self.gap = self._continue_above_cursors(name)
        if self.epoch is not None:
            self.epoch.begin(self.log.next_offset)

    def _continue_above_cursors(self, name):
        """Offsets never go backwards: if the log ends below what a durable subscription already
        counts as acknowledged (its tail was lost: a machine crash under --fsync interval, a
        torn tail truncated), the log continues above every cursor, else new records would get
        offsets (and ids) the subscription skips as acknowledged. Returns the gap or None."""
        known, who = 0, None
        for subscription, state in self.cursors().items():
            try:
                end = max([int(state.get("floor", 0))] + [int(o) + 1 for o in state.get("acked") or ()])
            except (TypeError, ValueError):
                continue
            if end > known:
                known, who = end, subscription
        gap = self.log.continue_at(known)
        if gap is not None:
            log.warning("topic %s: its log ends at offset %d, below offset %d up to which subscription %r "
                        "has acknowledged: offsets %d..%d were lost (a machine crash under --fsync "
                        "interval, or a torn tail truncated); the log continues at %d, so no offset is "
                        "handed out twice", name, gap[0], gap[1], who, gap[0], gap[1] - 1, gap[1],
                        extra={"topic": name})
        return gap

    def fenced_by(self):
        """The node that took this log over since we opened it (write nothing more), or None."""
        return self.epoch.taken() if self.epoch is not None else None

    def _cursor_path(self, subscription):
        return os.path.join(self.cursor_dir, digest(subscription) + ".json")

    def _migrate_cursors(self):
        """Cursor files of an earlier version (named by the hex of the name) take the digest's."""
        for entry, state in self._cursor_files():
            path = self._cursor_path(state["name"])
            if os.path.join(self.cursor_dir, entry) != path:
                if os.path.exists(path):   # the newer one is already there
                    os.unlink(os.path.join(self.cursor_dir, entry))
                else:
                    os.rename(os.path.join(self.cursor_dir, entry), path)

    def _cursor_files(self):
        """[(file name, state)] of the readable cursor files."""
        found = []
        for entry in os.listdir(self.cursor_dir):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.cursor_dir, entry)) as f:
                    state = json.load(f)
                if isinstance(state, dict) and isinstance(state.get("name"), str):
                    found.append((entry, state))
                else:
                    raise ValueError("not a cursor")
            except FileNotFoundError:
                continue   # (removed meanwhile: an unsubscribe)
            except (OSError, ValueError) as exc:
                log.error("cursor file %s is damaged (%s: %s): its subscription is not restored (a subscribe "
                          "under its name starts a new one)", os.path.join(self.cursor_dir, entry),
                          type(exc).__name__, exc)
        return found

    def save_cursor(self, subscription, state, durable=True):
        data = json.dumps(dict(state, name=subscription))
        if durable:
            _write_atomic(self._cursor_path(subscription), data)
        else:
            with open(self._cursor_path(subscription), "w") as f:
                f.write(data)

    def delete_cursor(self, subscription):
        try:
            os.unlink(self._cursor_path(subscription))
        except FileNotFoundError:
            pass

    def cursors(self):
        return {state["name"]: state for _, state in self._cursor_files()}

    def destroy(self):
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self):
        self.log.close()
