"""Scrubbing secrets from text before it reaches logs, error bodies or result messages.

Tokens (JWTs, bearer values), storage account keys, SAS signatures and the identity header's
value are replaced with a marker. Our own code never formats them in; this is the net below that,
for SDK messages and caller-supplied text we quote.
"""

from __future__ import annotations

import logging
import re

MARK = "***"
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/]+=*"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),  # JWT
    re.compile(r"(?i)(AccountKey=)[^;\s\"']+"),
    re.compile(r"(?i)(SharedAccessKey=)[^;\s\"']+"),
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s\"']+"),
    re.compile(r"(?i)([?&]sig=)[^&\s\"']+"),
    re.compile(r"(?i)(x-identity-header[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"(?i)(client_secret=)[^&\s\"']+"),
]


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MARK, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with secrets scrubbed (a handler filter sees every record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redact(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


_FILTER = RedactingFilter()


def install() -> None:
    """Scrub every record the process's root handlers emit (the Functions worker's included)."""
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
