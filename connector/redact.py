"""Masking secrets in every form they could travel in.

A proxy may echo a request back in its error page: the project key inside a
JSON body, the Amplitude keys as an HTTP Basic `Authorization` header (base64
of `key:secret`), a password inside a URL. `Redactor` masks each secret as it
is, base64-encoded (alone and as the Basic pair, with and without padding),
percent-encoded and JSON-escaped. Secrets shorter than MIN_SECRET characters
are not masked: a one-letter test secret would blank every such letter.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Iterable
from urllib.parse import quote, urlsplit, urlunsplit

MIN_SECRET = 4
MASK = "***"


def _forms(value: str) -> set[str]:
    raw = value.encode()
    b64 = base64.b64encode(raw).decode()
    return {value, b64, b64.rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("="),
            quote(value, safe=""), json.dumps(value)[1:-1]}


class Redactor:
    """Masks the given secrets, and HTTP Basic pairs of them, in any text."""

    def __init__(self, secrets: Iterable[str] = (), pairs: Iterable[tuple[str, str]] = ()):
        forms: set[str] = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET:
                forms |= _forms(secret)
        for user, password in pairs:
            if len(user) + len(password) >= MIN_SECRET:
                forms |= _forms(f"{user}:{password}")
        # Longest first, so a form containing another is masked whole.
        self._forms = sorted((f for f in forms if len(f) >= MIN_SECRET), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def snippet(text: str, redact: Redactor, limit: int = 120) -> str:
    """A short, single-line, secret-free excerpt of an answer, for error messages."""
    return redact(re.sub(r"\s+", " ", text[: limit * 4]).strip())[:limit]
