"""The Defender for Endpoint API: the client (its quotas and retry policy), the HTTP transport that
does the I/O, and the tokens."""
