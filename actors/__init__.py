"""The broker's actors: broker registry, listener, connections, topics, subscriptions, dispatchers."""
