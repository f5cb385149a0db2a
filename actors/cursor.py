"""A durable subscription's cursor: everything below `floor` is acknowledged, plus the
individually acknowledged offsets above it. Pure logic; the dispatcher persists its state()."""


class Cursor:
    def __init__(self, floor=0, acked=()):
        self.floor = floor
        self.acked = set(o for o in acked if o >= floor)

    def is_acked(self, offset):
        return offset < self.floor or offset in self.acked

    def ack(self, offset):
        """Returns True if this changed the cursor."""
        if self.is_acked(offset):
            return False
        self.acked.add(offset)
        while self.floor in self.acked:
            self.acked.discard(self.floor)
            self.floor += 1
        return True

    def skip_to(self, offset):
        """Offsets below `offset` are gone (retention): treat them as acknowledged."""
        if offset > self.floor:
            self.floor = offset
            self.acked = {o for o in self.acked if o >= offset}
            while self.floor in self.acked:
                self.acked.discard(self.floor)
                self.floor += 1

    def state(self):
        return {"floor": self.floor, "acked": sorted(self.acked)}
