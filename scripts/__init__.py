"""Command-line tools of actorbroker: serve, client commands, benchmarks."""
