"""At most one Defender call per idempotency key: the keys, the record and its pure decision, and the
Table Storage records."""
