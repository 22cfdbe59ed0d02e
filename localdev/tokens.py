"""Local access tokens: JWT-shaped, HMAC-signed with a secret the identity endpoint and the
simulator share, so the simulator can check audience, expiry and signature like Entra tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

DEFAULT_SECRET = "local-stack-token-secret"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(secret: str, audience: str, subject: str, lifetime: int, **extra: Any) -> tuple[str, int]:
    """A token for `audience`; `extra` claims (iss, tid, appid, roles...) as Entra would set them."""
    now = int(time.time())
    claims = {"aud": audience, "sub": subject, "oid": subject, "iat": now, "nbf": now, "exp": now + lifetime,
              "iss": "local-msi", **extra}  # fmt: skip
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}", now + lifetime


def verify(secret: str, token: str) -> dict[str, Any] | None:
    """The claims of a token this stack minted and that has not expired, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _unb64(parts[2])):
            return None
        claims: dict[str, Any] = json.loads(_unb64(parts[1]))
    except ValueError:
        return None
    return claims if claims.get("exp", 0) > time.time() else None
