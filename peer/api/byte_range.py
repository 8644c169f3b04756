"""HTTP Range requests for image files, decided without aiohttp (RFC 9110 section 14).

A booting machine's iPXE, the imaging agent's wget and curl resume downloads with
`Range: bytes=START-END`; anything else that arrives in that header comes from whoever is
on the store's LAN. `parse_range` is a pure function of the header values and the file's
size, bounded before any work (a header longer than MAX_HEADER_CHARS is refused unread),
so it can be fuzzed on its own and every refusal carries a fixed `reason` for a metric.

Decisions, each with its reason:
- one range only: several (`bytes=0-1,5-9`) would need a multipart/byteranges body that no
  boot client asks for, and a thousand tiny ranges are an amplification attack;
- If-Range is honoured strictly: a validator other than our strong ETag (a date, a weak
  tag, another file's tag) means "send it all", so a resumed download can never splice
  bytes of two different files;
- a range unit other than `bytes` is ignored (the whole file is sent), as RFC 9110
  section 14.2 says; a malformed `bytes` range is refused (416), as aiohttp did;
- `bytes=-0` (an empty suffix) is unsatisfiable (RFC 9110 section 14.1.3); a suffix longer
  than the file is the whole file; an end past the file is clamped to its last byte.
"""

from __future__ import annotations

from typing import NoReturn

MAX_HEADER_CHARS = 200  # far more than any real client sends (bytes=<20 digits>-<20 digits>)
_UNIT = "bytes"
_DIGITS = frozenset("0123456789")


class RangeNotSatisfiable(Exception):
    """The Range header cannot be served: answer 416 with `Content-Range: bytes */SIZE`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _number(text: str, what: str) -> int | None:
    if not text:
        return None
    # str.isdigit() accepts other scripts' digits ("٣") and int() would parse them; the
    # grammar is ASCII DIGIT only.
    if not _DIGITS.issuperset(text):
        raise RangeNotSatisfiable("malformed", f"{what} is not a number")
    return int(text)


def parse_range(
    range_header: str | None, if_range: str | None, etag: str, size: int
) -> tuple[int, int] | None:
    """(start, stop), half-open and inside [0, size), for a Range request; None to send the
    whole file. Raises RangeNotSatisfiable (with `.reason`) for a range to refuse."""
    if range_header is None:
        return None
    if if_range is not None and if_range != etag:
        return None
    if len(range_header) > MAX_HEADER_CHARS:
        raise RangeNotSatisfiable("too_long", f"Range header over {MAX_HEADER_CHARS} characters")
    value = range_header.strip(" \t")
    unit, eq, spec = value.partition("=")
    if not eq:
        raise RangeNotSatisfiable("malformed", "Range header without unit=ranges")
    if unit.strip(" \t").lower() != _UNIT:
        return None  # an unknown unit is ignored, not refused
    if "," in spec:
        raise RangeNotSatisfiable("multiple_ranges", "only one byte range per request")
    first, dash, last = spec.strip(" \t").partition("-")
    if not dash:
        raise RangeNotSatisfiable("malformed", "byte range without '-'")
    start = _number(first, "range start")
    end = _number(last, "range end")
    if start is None:
        if end is None:
            raise RangeNotSatisfiable("malformed", "byte range with neither start nor end")
        if end == 0:
            raise RangeNotSatisfiable("empty_suffix", "a suffix range of zero bytes")
        if size == 0:
            _past_end(size)
        return max(0, size - end), size
    if end is not None and end < start:
        raise RangeNotSatisfiable("reversed", "byte range ends before it starts")
    if start >= size:
        _past_end(size)
    stop = size if end is None else min(end + 1, size)
    return start, stop


def _past_end(size: int) -> NoReturn:
    raise RangeNotSatisfiable("past_end", f"byte range starts past the end ({size} bytes)")
