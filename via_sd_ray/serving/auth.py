"""Optional bearer-token auth, shared by the HTTP and gRPC ingresses.

The token comes from the environment of the ``Ingress`` replica: ``VIA_SD_API_TOKEN``, or the
file named by ``VIA_SD_API_TOKEN_FILE`` (a mounted secret). With neither set, auth is off.
Clients send ``Authorization: Bearer <token>`` (HTTP header, or gRPC metadata ``authorization``).
The token is never logged or echoed in an error, and tokens are compared as SHA-256 digests
with ``hmac.compare_digest``, so the comparison takes the same time whatever the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from via_sd_ray.errors import ConfigError, Unauthenticated

TOKEN_ENV = "VIA_SD_API_TOKEN"
TOKEN_FILE_ENV = "VIA_SD_API_TOKEN_FILE"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token: what fits in the header unquoted


class MissingToken(Unauthenticated):
    """No ``Bearer`` credentials in the request."""

    challenge = 'Bearer realm="via-sd"'


class InvalidToken(Unauthenticated):
    """``Bearer`` credentials that do not match the token."""

    challenge = 'Bearer realm="via-sd", error="invalid_token"'


def load_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The token clients must send, or None (auth off). A token that is set but empty or unusable is
    a configuration error, so a broken secret never silently turns auth off."""
    path, token = environ.get(TOKEN_FILE_ENV), environ.get(TOKEN_ENV)
    if path is not None and token is not None:
        raise ConfigError(f"{TOKEN_FILE_ENV}: expected either it or {TOKEN_ENV}, received both")
    source = TOKEN_ENV
    if path is not None:
        source = f"{TOKEN_FILE_ENV} ({path})"
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{TOKEN_FILE_ENV}: expected a readable UTF-8 file, received {path!r} "
                              f"({type(err).__name__})") from None
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ConfigError(f"{source}: expected a non-empty token, received an empty value (unset "
                          f"{TOKEN_ENV} and {TOKEN_FILE_ENV} to turn auth off)")
    if not TOKEN_CHARS.fullmatch(token):
        raise ConfigError(f"{source}: expected a token of letters, digits and -._~+/ (RFC 6750), received "
                          f"{len(token)} characters with others among them")
    return token


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class BearerAuth:
    """Checks ``Authorization`` values against the token; does nothing when there is no token."""

    def __init__(self, token: str | None):
        self._digest = _digest(token) if token else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> BearerAuth:
        return cls(load_token(environ))

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> None:
        """Raise ``MissingToken`` or ``InvalidToken`` unless ``authorization`` is ``Bearer <token>``."""
        if self._digest is None:
            return
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            given = "none" if not authorization else "another scheme" if credentials else "a malformed value"
            raise MissingToken(f"authorization: expected `Bearer <token>`, received {given}")
        if not hmac.compare_digest(_digest(credentials.strip()), self._digest):
            raise InvalidToken("authorization: expected a valid bearer token, received an invalid one")

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """``check`` on the gRPC metadata key ``authorization`` (gRPC lower-cases keys)."""
        value = next((v for k, v in (metadata or ()) if k.lower() == "authorization"), None)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        self.check(value)
