"""URLs as they may appear in logs and error messages.

A pre-signed storage URL carries its signature (a bearer credential until it expires) in
the query string, and a URL may carry ``user:password@``. Every URL this package puts in
a log line or an error message goes through :func:`redact_url` (or, for text written by
someone else, e.g. an aiohttp exception, :func:`redact_text`); the daemon's log formatters
pass every line through :func:`redact_text` as well, so a traceback's chained aiohttp
exception cannot print one either.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

#: What replaces a query string.
REDACTED = "REDACTED"

#: A URL inside text: stops at quotes and backslashes (JSON-escaped text stays valid) and
#: leaves trailing punctuation (``GET <url>: ...``) outside.
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>\\]*[^\s'\"<>\\.,:;)\]]")


def redact_url(url: object) -> str:
    """``url`` (a str or a yarl.URL) without userinfo, fragment and query; a query that
    was there shows as ``?REDACTED``."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:  # an unparsable URL: keep only what precedes any query
        return text.split("?", 1)[0].split("#", 1)[0]
    netloc = parts.netloc.rpartition("@")[2]
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted by :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)
