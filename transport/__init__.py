"""Wire side of actorbroker: the sans-IO frame codec, the TCP transport actor and the clients."""
