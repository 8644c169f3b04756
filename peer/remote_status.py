"""GET a peer's /v1/status from another machine, treating the answer as hostile.

Used by `pxepeer status --url/--site-wide` and `pxepeer fleet targets`, which ask many
peers, some of them across a WAN and some not ours to trust: every request has a deadline
for the whole answer (not only per socket read, so a peer dripping one byte a second
cannot hold a run), a size limit, strict JSON (imaging/strict_json.py), and follows no
redirect (a bearer token must not be carried to a host the answer names).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from imaging.strict_json import StrictJsonError, loads

MAX_STATUS_BYTES = 8 << 20
DEFAULT_TIMEOUT = 5.0


@dataclass
class StatusError(Exception):
    """Why a peer's status could not be read. `reason` is short and fixed; `code` is the
    HTTP status for refusals (401, 403...), else 0."""

    reason: str
    detail: str
    code: int = 0

    def __str__(self) -> str:
        return self.detail

    @property
    def refused(self) -> bool:
        return self.code in (401, 403)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def read_bounded(resp, max_bytes: int, deadline: float) -> bytes:  # type: ignore[no-untyped-def]
    parts: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise StatusError("timeout", "the answer took too long")
        block = resp.read(min(65536, max_bytes + 1 - size))
        if not block:
            return b"".join(parts)
        parts.append(block)
        size += len(block)
        if size > max_bytes:
            raise StatusError("too big", f"the answer is over {max_bytes} bytes")


def fetch_status(
    base: str,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_STATUS_BYTES,
) -> dict:
    """The status document of the peer at `base` (http://HOST:PORT); StatusError else."""
    target = f"{base}/v1/status"
    request = urllib.request.Request(target, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            data = read_bounded(resp, max_bytes, deadline)
    except StatusError as exc:
        exc.detail = f"{target}: {exc.detail}"
        raise
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code == 401:
            hint = " (a viewer token is needed: --token, --token-file or PXEPEER_TOKEN)"
        elif exc.code == 403:
            hint = " (the token's role is too low)"
        raise StatusError("http", f"{target}: {exc.code} {exc.reason}{hint}", exc.code) from None
    except TimeoutError:
        raise StatusError("timeout", f"{target}: no answer in {timeout:g} s") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise StatusError("timeout", f"{target}: no answer in {timeout:g} s") from None
        raise StatusError("unreachable", f"cannot read {target}: {reason}") from None
    try:
        doc = loads(data, max_bytes)
    except StrictJsonError as exc:
        raise StatusError("bad json", f"{target}: the answer is not JSON ({exc.reason})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("site"), dict):
        raise StatusError("not a status", f"{target}: the answer is not a status document")
    return doc
