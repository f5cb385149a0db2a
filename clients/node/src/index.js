// actorbroker-client: a Node.js client of the actorbroker wire protocol (docs/protocol.md).
export { connect, Client, PROTOCOL_VERSION } from "./client.js";
export { Producer } from "./producer.js";
export { Consumer, Message } from "./consumer.js";
export { encodeFrame, FrameDecoder } from "./codec.js";
export { parseAddress, DEFAULT_HOST, DEFAULT_PORT } from "./address.js";
export { ActorbrokerError, BrokerError, ClosedError, ConnectionError, ProtocolError, TimeoutError } from "./errors.js";
