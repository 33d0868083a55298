"""STATE_STORE_URL: which backend it names, and how it may be shown.

`postgresql://user:password@host:5432/db` (or `postgres://`) names a PostgreSQL
store; a file path or `sqlite:///path` names an embedded SQLite file. A
PostgreSQL URL carries a password, so it is only ever shown through `masked`,
and any text that might echo it (psycopg's own error messages can quote the
connection string) goes through `scrub` before it is logged or raised.

Pure string work, standard library only: `config` validates with it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")
MASK = "***"
# A password written as a libpq keyword (`password=...`), in a query string or a DSN.
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
# The userinfo password of any URL-looking text: scheme://user:password@
_USERINFO_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)
# Shorter passwords are not searched for in free text: masking every "ab" would
# garble messages (the structural patterns above still apply).
_MIN_SCRUB = 4


def is_postgres(url: str) -> bool:
    return urlsplit(url).scheme.lower() in POSTGRES_SCHEMES


def check_postgres(url: str) -> None:
    """Raise ValueError unless `url` is a usable postgresql:// URL (a host is required)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in POSTGRES_SCHEMES or not parts.hostname:
        raise ValueError("a postgresql:// URL needs a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError("the port is not a number") from None


def passwords(url: str) -> tuple[str, ...]:
    """Every form of the password the URL carries (as written and decoded), longest first."""
    parts = urlsplit(url)
    found: set[str] = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found |= {raw, unquote(raw)}
    for value in parse_qs(parts.query).get("password", []):
        found.add(value)
    return tuple(sorted((p for p in found if p), key=len, reverse=True))


def masked(url: str) -> str:
    """The URL as it may be printed: its password, wherever written, replaced by ***."""
    if "://" not in url:
        return url  # a file path holds no password
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        netloc = f"{userinfo}@{host}"
    query = _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + MASK, parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """`text` with the URL's password masked: the URL itself, any form of the password
    of 4 characters or more, and anything shaped like a password (`password=...`,
    `scheme://user:...@`)."""
    if url and url in text:
        text = text.replace(url, masked(url))
    for secret in passwords(url):
        if len(secret) >= _MIN_SCRUB:
            text = text.replace(secret, MASK)
    text = _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    return _USERINFO_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
