// Every error this client raises carries a `code`: the protocol's code (docs/protocol.md) when
// the broker sent it, or one of the client's own codes below.

/** Base class of every error of this package. */
export class ActorbrokerError extends Error {
  constructor(code, message, options) {
    super(message, options);
    this.name = "ActorbrokerError";
    this.code = code;
  }
}

/** An `error` frame from the broker: `code` is the protocol's code, `rid` the request's id. */
export class BrokerError extends ActorbrokerError {
  constructor(code, message, rid) {
    super(code, message);
    this.name = "BrokerError";
    this.rid = rid;
  }
}

/** The byte stream broke a framing rule (code BAD_FRAME or FRAME_TOO_LARGE). */
export class ProtocolError extends ActorbrokerError {
  constructor(code, message) {
    super(code, message);
    this.name = "ProtocolError";
  }
}

/** The connection is gone (code CONNECTION_LOST) or was closed by this client (code CLIENT_CLOSED). */
export class ConnectionError extends ActorbrokerError {
  constructor(code, message, options) {
    super(code, message, options);
    this.name = "ConnectionError";
  }
}

/** The broker ended a producer or consumer (code CLOSED; `reason` as in its `closed` push). */
export class ClosedError extends ActorbrokerError {
  constructor(reason, what) {
    super("CLOSED", `${what} closed by the broker: ${reason}`);
    this.name = "ClosedError";
    this.reason = reason;
  }
}

/** A wait that ran out of time (code TIMEOUT). */
export class TimeoutError extends ActorbrokerError {
  constructor(message) {
    super("TIMEOUT", message);
    this.name = "TimeoutError";
  }
}
