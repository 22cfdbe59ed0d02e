"""Azure Storage adapters: the clients, the one error translation, the audit trail and the bulk jobs.
With shared.ratelimit.table, shared.idempotency.table and shared.defender.token, the only modules
that import azure.*."""
