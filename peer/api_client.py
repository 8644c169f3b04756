"""A client for a peer's token-protected API (`pxepeer assign --url PEER --token T`):
one request, one JSON answer, every failure one line (RemoteError)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

MAX_ANSWER = 1 << 20


class RemoteError(Exception):
    pass


def check_url(url: str) -> str:
    """The peer's base URL without a trailing slash; RemoteError when it is no http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"--url {url!r}: want http://PEER:PORT")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise RemoteError(f"--url {url!r}: want the peer's address only, e.g. http://PEER:8080")
    return f"{parts.scheme}://{parts.netloc}"


def call(base: str, token: str, method: str, path: str, doc: object | None = None,
         timeout: float = 10.0) -> dict:  # fmt: skip
    body = json.dumps(doc).encode() if doc is not None else None
    request = urllib.request.Request(f"{base}{path}", data=body, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = resp.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        text = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
        raise RemoteError(f"{base}{path}: {exc.code} {exc.reason}: {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RemoteError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}") from None
    try:
        value = json.loads(answer)
    except ValueError:
        raise RemoteError(f"{base}{path}: the answer is not JSON") from None
    if not isinstance(value, dict):
        raise RemoteError(f"{base}{path}: the answer is not a JSON object")
    return value
