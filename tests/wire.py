"""A raw protocol connection for tests: frames in and out, by hand, with timeouts."""
import collections
import socket
import time

from actorbroker.transport.codec import FrameDecoder, encode_frame


class RawConnection:
    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(max_frame=64 * 1024 * 1024)
        self.last_rid = 0
        self.welcome = None
        self.skipped = collections.deque()   # frames request() passed over, for recv_frame

    encode = staticmethod(encode_frame)

    def send_frame(self, frame):
        self.sock.sendall(encode_frame(frame))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_frame(self, timeout=5.0):
        """The next frame; None on EOF; TimeoutError if nothing whole arrives in time."""
        if self.skipped:
            return self.skipped.popleft()
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame within %.1fs" % timeout)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no frame within %.1fs" % timeout)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def request(self, frame, timeout=5.0, expect_error=False):
        """Send `frame` with a new rid and return the frame answering it. Other frames that
        arrive meanwhile are kept for recv_frame. An error answer fails unless expect_error."""
        self.last_rid += 1
        rid = self.last_rid
        self.send_frame(dict(frame, rid=rid))
        deadline = time.monotonic() + timeout
        held = []
        while True:
            reply = self._recv_new(max(0.01, deadline - time.monotonic()))
            if reply is None:
                raise ConnectionError(f"closed while waiting for the answer to {frame}")
            if reply.get("rid") == rid and reply["op"] != "ping":
                self.skipped.extend(held)
                if reply["op"] == "error" and not expect_error:
                    raise AssertionError(f"{frame} failed: {reply}")
                return reply
            if reply["op"] == "ping":
                self.send_frame({"op": "pong", "rid": reply["rid"]})
            else:
                held.append(reply)

    def _recv_new(self, timeout):
        saved, self.skipped = self.skipped, collections.deque()
        try:
            return self.recv_frame(timeout)
        finally:
            self.skipped = saved

    def hello(self, **extra):
        self.welcome = self.request(dict({"op": "hello", "version": 1, "client": "test"}, **extra))
        return self.welcome

    def wait_for(self, probe, condition, timeout=10.0):
        from tests.util import wait_for
        return wait_for(probe, condition, timeout)

    def expect_closed(self, timeout=5.0):
        """True when the broker closes the connection within `timeout` (frames before are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv_frame(deadline - time.monotonic()) is None:
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self):
        self.sock.close()
