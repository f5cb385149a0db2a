"""How a scenario step can end other than well: failed (with what was expected and what
arrived), or the whole scenario skipped because the broker lacks what it needs."""


class StepFailed(Exception):
    """A step whose expectation did not hold; `detail` is the expected vs arrived text; `code` the
    error code when the broker (or the client's end) refused what the step asked."""

    def __init__(self, message, detail="", code=None):
        super().__init__(message)
        self.detail = detail
        self.code = code


class ScenarioSkipped(Exception):
    """The broker lacks what the scenario needs (e.g. it answers UNKNOWN_OP to `watch`)."""


CLIENT_GONE = "CLIENT_GONE"   # the code of a request whose client process ended before answering
