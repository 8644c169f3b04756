"""The imaging agent's progress report, parsed strictly and within bounds.

The agent (busybox ash, imaging/agent/pxepeer-agent.sh) posts `key=value` lines, what
busybox wget can send without an encoder:

    state=writing
    manifest=<64 hex>
    image=demo-disk 1
    disk=/dev/vda
    total=10            done=4           bytes=16777216   size=41943040   fetched=8388608
    peers=http://10.0.0.2:8080=3,http://10.0.0.3:8080=1     (chunks fetched from each)
    corrupt=http://10.0.0.3:8080=1                          (corrupt chunks from each)
    message=4/10 chunks

Anyone on the LAN can post one, so every report is treated as hostile: a single report
whose `corrupt=` count was huge once froze a daemon. `parse_report` takes any bytes and
either returns a `ProgressReport` or raises `ReportError` with a short fixed `reason`
(a metric label, never text from the wire). Every size is checked before anything is
built from it: the body, the number of lines, each value, each number's digits, the
number of peer entries. An empty value means "not reported" (the agent sends `peers=`
before it has fetched anything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_BODY = 16 * 1024
MAX_LINES = 64
MAX_INT = 2**53  # exact in a float and in JSON readers everywhere
MAX_COUNT = 1 << 24  # chunks per peer: 64 TiB of 4 MiB chunks; larger counts are clamped
MAX_PEERS = 64
MAX_URL = 200
MAX_MESSAGE = 300
MAX_TEXT = 256  # image title and disk path
STATES = frozenset({"planned", "starting", "planning", "writing", "verifying", "done", "failed"})
KEYS = frozenset(
    {"state", "manifest", "image", "disk", "total", "done", "bytes", "size", "fetched",
     "peers", "corrupt", "message"}
)  # fmt: skip

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts "²" and "٣"
_MANIFEST_ID = re.compile(r"[0-9a-f]{64}")
# http://host[:port]: the plan names peers as http://ADDRESS:PORT; the peer the agent
# asked is named by the Host header it was reached with, which has no port on port 80.
_PEER_URL = re.compile(
    r"http://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
# C0/C1 controls (terminal escapes in `pxepeer status`) and Unicode line breaks; a tab
# is harmless and busybox messages may hold one.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


class ReportError(ValueError):
    """The bytes are not a progress report we accept; `reason` is a short fixed label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ProgressReport:
    state: str  # one of STATES
    manifest: str | None = None  # the manifest id the agent is writing
    image: str | None = None  # "name version", as the agent shows it
    disk: str | None = None
    total: int | None = None  # chunks in the disk image
    done: int | None = None  # chunks on the disk, verified
    bytes: int | None = None  # bytes of the image on the disk
    size: int | None = None  # bytes of the disk image
    fetched: int | None = None  # bytes downloaded from peers
    message: str | None = None
    # (peer URL, chunks) pairs: a tuple, so the report stays hashable and immutable.
    peers: tuple[tuple[str, int], ...] = field(default=())
    corrupt: tuple[tuple[str, int], ...] = field(default=())

    def peers_used(self) -> dict[str, int]:
        return dict(self.peers)

    def corrupt_from(self) -> dict[str, int]:
        return dict(self.corrupt)


def parse_report(body: bytes) -> ProgressReport:
    """One report from any bytes, or ReportError. Nothing else escapes."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ReportError("not_bytes")
    if len(body) > MAX_BODY:
        raise ReportError("too_big", f"{len(body)} bytes")
    data = bytes(body)
    # Counted before splitting, so a body of 16,000 newlines is refused before it
    # becomes 16,000 strings. A final newline ends the last line, it starts none.
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if lines > MAX_LINES:
        raise ReportError("too_many_lines")
    try:
        text = data.decode("utf-8")  # strict: invalid UTF-8 is refused, not replaced
    except UnicodeDecodeError:
        raise ReportError("invalid_utf8") from None
    fields: dict[str, str] = {}
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ReportError("not_key_value")
        if key not in KEYS:
            raise ReportError("unknown_key")
        if key in fields:
            # Last-one-wins would let a proxy and the server read different reports.
            raise ReportError("duplicate_key")
        fields[key] = value.strip()
    return _build(fields)


def _build(fields: dict[str, str]) -> ProgressReport:
    state = fields.get("state", "")
    if not state:
        # The state is the event the job's transitions table is driven by.
        raise ReportError("no_state")
    if state not in STATES:
        raise ReportError("unknown_state")
    manifest = fields.get("manifest") or None
    if manifest is not None and not _MANIFEST_ID.fullmatch(manifest):
        raise ReportError("bad_manifest")
    return ProgressReport(
        state=state,
        manifest=manifest,
        image=_text(fields.get("image"), MAX_TEXT),
        disk=_text(fields.get("disk"), MAX_TEXT),
        total=_int(fields.get("total")),
        done=_int(fields.get("done")),
        bytes=_int(fields.get("bytes")),
        size=_int(fields.get("size")),
        fetched=_int(fields.get("fetched")),
        # An empty message is a message: it clears the last run's text.
        message=None if "message" not in fields else _text(fields["message"], MAX_MESSAGE) or "",
        peers=_peer_counts(fields.get("peers")),
        corrupt=_peer_counts(fields.get("corrupt")),
    )


def _text(value: str | None, limit: int) -> str | None:
    if not value:
        return None
    if len(value) > limit:
        raise ReportError("value_too_long")
    if _CONTROL.search(value):
        raise ReportError("control_character")
    return value


def _int(value: str | None) -> int | None:
    if not value:
        return None
    # Digits are counted before int() runs: int() of a long string costs quadratic time.
    if len(value) > len(str(MAX_INT)) or not _DIGITS.fullmatch(value):
        raise ReportError("bad_number")
    number = int(value)
    if number > MAX_INT:
        raise ReportError("number_too_big")
    return number


def _peer_counts(value: str | None) -> tuple[tuple[str, int], ...]:
    """`URL=N,URL=N`: at most MAX_PEERS distinct well-formed peer URLs."""
    if not value:
        return ()
    # Counted before splitting: a value of 10,000 commas is refused as it is.
    if value.count(",") >= MAX_PEERS:
        raise ReportError("too_many_peers")
    counts: dict[str, int] = {}
    for item in value.split(","):
        url, sep, count = item.rpartition("=")
        if not sep or not url:
            raise ReportError("bad_peer_entry")
        if len(url) > MAX_URL:
            raise ReportError("peer_url_too_long")
        match = _PEER_URL.fullmatch(url)
        if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
            raise ReportError("bad_peer_url")
        if url in counts:
            raise ReportError("duplicate_peer")
        number = _int(count)
        if number is None:
            raise ReportError("bad_peer_entry")
        # Clamped, not refused: a count past any real disk is still one honest-looking
        # report of "some"; what it may cost the peer is decided per report, not per count.
        counts[url] = min(number, MAX_COUNT)
    return tuple(counts.items())
