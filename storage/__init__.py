"""Durable storage of reliable topics: segment logs and subscription cursors (plain file I/O,
no actors; the LogActor in actors/ owns the files and does the I/O)."""
