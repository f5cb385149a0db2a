"""A reliable topic's directory: its log, its metadata and its subscriptions' cursors.

    <data>/topics/<hex of topic name>/topic.json        {"name", "dispatch"}
    <data>/topics/<hex of topic name>/log/*.log          the SegmentLog
    <data>/topics/<hex of topic name>/cursors/<hex>.json one per durable subscription

Directory names are hex so that no topic name ('.', '..') can escape the data folder.
Cursor files are replaced atomically (write, fsync, rename).
"""
import json
import os
import shutil

from actorbroker.storage.segment_log import SegmentLog


def topics_root(data_dir):
    return os.path.join(data_dir, "topics")


def topic_dir(data_dir, name):
    return os.path.join(topics_root(data_dir), name.encode().hex())


def stored_topics(data_dir):
    """[(name, dispatch)] of the topics kept on disk."""
    found = []
    root = topics_root(data_dir)
    if not os.path.isdir(root):
        return found
    for entry in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, entry, "topic.json")) as f:
                meta = json.load(f)
            found.append((meta["name"], meta["dispatch"]))
        except (OSError, ValueError, KeyError):
            continue
    return found


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TopicStore:
    def __init__(self, data_dir, name, dispatch, segment_bytes):
        self.directory = topic_dir(data_dir, name)
        self.cursor_dir = os.path.join(self.directory, "cursors")
        os.makedirs(self.cursor_dir, exist_ok=True)
        meta = os.path.join(self.directory, "topic.json")
        if not os.path.exists(meta):
            _write_atomic(meta, json.dumps({"name": name, "dispatch": dispatch}))
        self.log = SegmentLog(os.path.join(self.directory, "log"), segment_bytes)

    def _cursor_path(self, subscription):
        return os.path.join(self.cursor_dir, subscription.encode().hex() + ".json")

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
        found = {}
        for entry in os.listdir(self.cursor_dir):
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.cursor_dir, entry)) as f:
                    state = json.load(f)
                found[state["name"]] = state
            except (OSError, ValueError, KeyError):
                continue
        return found

    def destroy(self):
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self):
        self.log.close()
