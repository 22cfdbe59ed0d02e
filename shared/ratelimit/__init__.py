"""The shared rate limiter: the pure rule, the limiter that applies it to a stored log, and the
log's stores (Table Storage, memory)."""
