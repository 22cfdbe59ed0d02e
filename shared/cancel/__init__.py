"""The cancel service (idempotency, quota, upstream call, audit), bulk cancels, and the commands
they act on."""
