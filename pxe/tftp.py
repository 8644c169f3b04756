"""Read-only TFTP without I/O: packet codec, option negotiation and the sending state machine.

RFC 1350 (TFTP), 2347 (options), 2348 (blksize), 2349 (timeout, tsize), 7440 (windowsize).
Bytes and an explicit clock go in, datagrams to send come out; sockets, threads and files
live in `pxe.tftp_server`.

The codec is a few byte operations rather than tftpy's packet classes. Measured here
(bench/tftp_throughput.py --codec, and a fuzz loop): an ACK parses in ~0.3 µs against
~1.3 µs with tftpy, an EDK2 RRQ in ~2.5 µs against ~13 µs; the session's ACK fast path
skips even that (~0.3 µs per ACK including the next DATA). On garbage tftpy raises
TftpException, UnicodeDecodeError or struct.error, and it reads option names
case-sensitively; `parse_packet` raises only `MalformedPacket`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

MIN_BLKSIZE = 8  # RFC 2348
MAX_BLKSIZE = 65464  # RFC 2348: the largest payload of one UDP datagram over IPv4 jumbo
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535  # RFC 7440
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349, seconds
# The most a client may make us wait between retransmissions. RFC 2349 allows up to 255 s;
# 64 never-ACKing requests asking that held every session slot for ~25 minutes (6 tries).
TIMEOUT_CAP = 5
SUPPORTED_MODES = ("octet", "netascii")

_HEADER = struct.Struct("!HH")


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8  # RFC 2347: the client declines the server's OACK


class MalformedPacket(ValueError):
    """A datagram that is not a TFTP packet; the caller drops and counts it by `reason`.

    `reason` is one of a few fixed short strings (a metric label); the message has details.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


# Reasons a datagram is dropped (the labels of the `dropped` counters).
TRUNCATED = "truncated"
BAD_OPCODE = "bad opcode"
BAD_REQUEST = "bad request"  # an RRQ/WRQ without a NUL-terminated, non-empty name and mode


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ. Option names are lower-cased (RFC 2347: case-insensitive), first one wins."""

    opcode: Opcode
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class OptionAck:
    options: dict[str, str]


Packet = Request | Data | Ack | Error | OptionAck


def _strings(body: bytes) -> tuple[list[bytes], bytes]:
    """NUL-terminated fields of `body`, and whatever unterminated bytes trail them."""
    parts = body.split(b"\0")
    return parts[:-1], parts[-1]


def parse_packet(data: bytes) -> Packet:
    """One datagram as a packet, or MalformedPacket (never any other exception)."""
    size = len(data)
    if size < 2:
        raise MalformedPacket(TRUNCATED, f"{size}-byte datagram is too short for an opcode")
    opcode = (data[0] << 8) | data[1]
    if opcode == 4 and size >= 4:  # ACK, the commonest by far
        return Ack((data[2] << 8) | data[3])
    if opcode == 1 or opcode == 2:
        return _parse_request(Opcode(opcode), data[2:])
    if 3 <= opcode <= 5 and size < 4:
        raise MalformedPacket(TRUNCATED, f"truncated {Opcode(opcode).name} ({size} bytes)")
    if opcode == 3:
        return Data((data[2] << 8) | data[3], bytes(data[4:]))
    if opcode == 5:
        fields, rest = _strings(data[4:])
        text = fields[0] if fields else rest  # lenient: some clients forget the final NUL
        return Error((data[2] << 8) | data[3], text.decode("utf-8", "replace"))
    if opcode == 6:
        fields, _ = _strings(data[2:])
        return OptionAck(_options(fields))
    raise MalformedPacket(BAD_OPCODE, f"unknown opcode {opcode}")


def _parse_request(opcode: Opcode, body: bytes) -> Request:
    fields, _ = _strings(body)
    if len(fields) < 2:
        raise MalformedPacket(
            BAD_REQUEST, f"{opcode.name} without a NUL-terminated filename and mode"
        )
    raw_name, raw_mode = fields[0], fields[1]
    if not raw_name:
        raise MalformedPacket(BAD_REQUEST, f"{opcode.name} with an empty filename")
    # surrogateescape keeps the client's exact bytes, so a UTF-8 (or any) name on disk
    # still matches; the boot source decides whether it may be served.
    filename = raw_name.decode("utf-8", "surrogateescape")
    mode = raw_mode.decode("ascii", "replace").lower()
    # An unpaired trailing option name (a truncated request) is ignored, as tftpd-hpa does.
    return Request(opcode, filename, mode, _options(fields[2:]))


def _options(fields: list[bytes]) -> dict[str, str]:
    options: dict[str, str] = {}
    for i in range(0, len(fields) - 1, 2):
        name = fields[i].decode("ascii", "replace").lower()
        options.setdefault(name, fields[i + 1].decode("ascii", "replace"))
    return options


def encode_request(
    filename: str, mode: str = "octet", options: Mapping[str, str | int] | None = None,
    *, opcode: Opcode = Opcode.RRQ,
) -> bytes:  # fmt: skip
    fields = [filename.encode("utf-8", "surrogateescape"), mode.encode()]
    for name, value in (options or {}).items():
        fields += [name.encode(), str(value).encode()]
    return opcode.to_bytes(2, "big") + b"".join(f + b"\0" for f in fields)


def encode_data(block: int, payload: bytes) -> bytes:
    return _HEADER.pack(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    return _HEADER.pack(Opcode.ERROR, code) + message.encode("ascii", "replace") + b"\0"


def encode_oack(options: Mapping[str, str]) -> bytes:
    body = b"".join(f"{name}\0{value}\0".encode() for name, value in options.items())
    return Opcode.OACK.to_bytes(2, "big") + body


# ---------------------------------------------------------------------------------------
# Option negotiation


@dataclass(frozen=True)
class ServerLimits:
    """What the server grants at most, and what it uses when the client asks for nothing."""

    blksize_cap: int = 1468  # an Ethernet MTU of 1500 minus IP, UDP and TFTP headers
    windowsize_cap: int = 64
    default_timeout: float = 1.0  # seconds before a retransmission when no option says
    retries: int = 5  # retransmissions of one packet (or window) before giving up
    timeout_cap: int = TIMEOUT_CAP  # the largest `timeout` option granted, seconds
    # Wall time one transfer may take, whatever its ACKs and retransmissions do. Boot files
    # served over TFTP are iPXE first stages (~0.1-1 MiB): 1 MiB at blksize 512 in 120 s is
    # 17 blocks a second, 60 ms per lock-step round trip, far slower than any LAN client
    # that works, and even the 32 MiB rollover test file takes a few seconds here. A client
    # slower than that holds a slot others need; it gets an ERROR and may ask again.
    transfer_deadline: float = 120.0


@dataclass(frozen=True)
class TransferOptions:
    """The parameters of one transfer, and the options to echo in the OACK (client order)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    acknowledged: dict[str, str] = field(default_factory=dict)


def _decimal(value: str, limit_digits: int = 12) -> int | None:
    """A plain decimal number, or None. `int()` alone would accept ' 1_0 ', '+5' or '²'."""
    value = value.strip()
    if not value or not value.isascii() or not value.isdigit():
        return None
    # Absurdly long numbers are still numbers (clamped by the caller), but never parsed
    # digit by digit: Python refuses int() of more than 4300 digits.
    return int(value) if len(value) <= limit_digits else 10**limit_digits


def negotiate(
    requested: Mapping[str, str], file_size: int, limits: ServerLimits = ServerLimits()
) -> TransferOptions:
    """Grant what the server can of the client's options (RFC 2347-2349, 7440).

    An option is acknowledged only with a value the client can accept: blksize and
    windowsize may be lowered (never raised), timeout is lowered to `limits.timeout_cap`,
    tsize carries the real size. Invalid or unknown options are left out, never refused.

    RFC 2349 has the server echo the timeout as asked or leave it out; echoing the clamped
    value instead tells the client what the server really does (a client that cannot live
    with it may decline the OACK, RFC 2347), and no client seen (curl asks 6, others
    nothing) checks it. The value only sets the server's own retransmission interval.
    """
    timeout_cap = max(MIN_TIMEOUT, limits.timeout_cap)
    blksize, windowsize = DEFAULT_BLKSIZE, 1
    timeout = min(limits.default_timeout, float(timeout_cap))
    acked: dict[str, str] = {}
    cap = max(MIN_BLKSIZE, min(MAX_BLKSIZE, limits.blksize_cap))
    for name, raw in requested.items():
        value = _decimal(raw)
        if name == "blksize":
            # Below 8 is invalid (RFC 2348): ignoring it keeps the default 512, which is the
            # only safe answer since the server may not offer more than was asked.
            if value is not None and value >= MIN_BLKSIZE:
                blksize = min(value, cap)
                acked[name] = str(blksize)
        elif name == "windowsize":
            if value is not None and value >= 1:
                windowsize = min(value, limits.windowsize_cap, MAX_WINDOWSIZE)
                acked[name] = str(windowsize)
        elif name == "timeout":
            if value is not None and MIN_TIMEOUT <= value <= MAX_TIMEOUT:
                granted = min(value, timeout_cap)
                timeout = float(granted)
                acked[name] = str(granted)
        elif name == "tsize":
            # RRQ carries 0 (RFC 2349); whatever it carries, the answer is the real size.
            if value is not None:
                acked[name] = str(file_size)
    return TransferOptions(blksize, windowsize, timeout, acked)


def to_netascii(data: bytes) -> bytes:
    """RFC 764 line endings: CR becomes CR NUL, then LF becomes CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


# ---------------------------------------------------------------------------------------
# The sending side of a read request


class Outcome(Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"  # the client declined the OACK: EDK2's size probe, quietly
    FAILED = "failed"


class _State(Enum):
    OACK_SENT = "oack-sent"
    SENDING = "sending"
    DONE = "done"


ReadAt = Callable[[int, int], bytes]

_READ_AHEAD = 256 * 1024  # file bytes fetched per read_at call: few syscalls, fits in cache


DEADLINE_MESSAGE = "transfer took too long"


class ReadSession:
    """Sends one file to one client: call start(), then receive() per datagram from the
    client's TID and tick() when `deadline` passes; each returns the datagrams to send.

    `max_seconds` bounds the whole transfer from start(): past it the session fails with
    an ERROR to the client (`expired` is set), however the client paces its ACKs.

    Blocks are numbered from 1 internally without limit; on the wire they wrap at 65535
    to 0, the rollover every current client expects. The file is read through `read_at`
    (the adapter's file; tests pass a bytes slice), a large slice at a time.
    """

    def __init__(
        self, read_at: ReadAt, size: int, options: TransferOptions, retries: int = 5,
        max_seconds: float = float("inf"),
    ):  # fmt: skip
        self.size = size
        self.max_seconds = max_seconds
        self.options = options
        self.retries = retries
        self.blksize = options.blksize
        self.windowsize = options.windowsize
        self.timeout = options.timeout
        # The last block is short; a size that is a multiple of blksize ends with an empty one.
        self.last_block = size // self.blksize + 1
        self.outcome: Outcome | None = None
        self.reason = ""
        self.deadline = float("inf")  # when tick() must run next
        self.expires = float("inf")  # the transfer's end at the latest; set by start()
        self.expired = False
        self.retransmits = 0
        self.malformed = 0
        self.dropped: dict[str, int] = {}  # malformed datagrams by MalformedPacket.reason
        self._read_at = read_at
        self._state = _State.SENDING
        self._acked = 0  # highest block the client acknowledged
        self._last_sent = 0  # highest block sent
        self._tries = 0  # retransmissions of the current packet or window
        self._chunk_blocks = max(1, _READ_AHEAD // self.blksize)
        self._chunk_first = 1  # blocks _chunk_first.. are held in _packets, once loaded
        # The DATA datagrams of one read-ahead chunk, built in one go (a comprehension
        # costs less per block than a call per block) and handed out as they are.
        self._packets: list[bytes] | None = None
        # The ACK that moves a lock-step transfer on (see `lockstep`); None when there is
        # none: windowsize above 1, an OACK outstanding, the transfer over.
        self._next_ack: bytes | None = None
        self._lockstep_until = float("-inf")  # see `lockstep`; set by start()

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def bytes_acknowledged(self) -> int:
        """File bytes the client has confirmed."""
        return min(self._acked * self.blksize, self.size)

    def start(self, now: float) -> list[bytes]:
        self.expires = now + self.max_seconds
        # The fast path stops one timeout before the end, so the deadline it sets is always
        # `now + timeout` (the adapter's timer stays as it is) and expiry takes the slow one.
        self._lockstep_until = self.expires - self.timeout
        if self.options.acknowledged:
            self._state = _State.OACK_SENT
            self._arm(now)
            return [encode_oack(self.options.acknowledged)]
        # No option accepted: RFC 2347 says answer as plain RFC 1350, DATA 1 at once.
        return self._send_window(1, now)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        # Fast path first: nearly every datagram of a transfer is a 4-byte ACK.
        if len(data) == 4 and data[0] == 0 and data[1] == Opcode.ACK:
            return self._on_ack((data[2] << 8) | data[3], now)
        if self._state is _State.DONE:
            return []
        try:
            packet = parse_packet(data)
        except MalformedPacket as exc:
            self.malformed += 1
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            return []
        if isinstance(packet, Ack):
            return self._on_ack(packet.block, now)  # an ACK with trailing bytes
        if isinstance(packet, Error):
            if self._state is _State.OACK_SENT:
                self._finish(Outcome.ABORTED, f"client declined options: {_describe(packet)}")
            else:
                self._finish(Outcome.FAILED, f"client sent error {_describe(packet)}")
        # Anything else from the client (DATA, a repeated request) has no meaning here.
        return []

    def lockstep(self, data: bytes, now: float) -> bytes | None:
        """The common case of a windowsize-1 transfer in one step: `data` is the ACK of the
        block just sent, the file has more and the transfer has time left. Returns the next
        DATA datagram, with the state moved on exactly as `receive` would and the deadline
        at `now + timeout`. Returns None, changing nothing, for anything else: then call
        `receive`. A per-packet loop pays a few attribute stores here instead of the general
        path's calls and lists, which is most of the server's own CPU per block.
        """
        if data != self._next_ack or now >= self._lockstep_until:
            return None
        block = self._last_sent
        if block >= self.last_block:
            return None  # the last ACK: `receive` finishes the transfer
        self._acked = block
        self._tries = 0
        block += 1
        self._last_sent = block
        self.deadline = now + self.timeout
        self._next_ack = _HEADER.pack(Opcode.ACK, block & 0xFFFF)
        index = block - self._chunk_first
        packets = self._packets
        if packets is None or index >= len(packets):
            return self._data_packet(block)
        return packets[index]

    def lockstep_window(self) -> tuple[int, int, float] | None:
        """What an outside fast path (pxe/_lockstep.c) may do in `lockstep`'s place:
        `(last_sent, last_block, until)`, meaning an ACK of `last_sent` (low 16 bits), while
        `last_sent < last_block` and before `until`, is answered with DATA `last_sent + 1`,
        and so on from there. None when `lockstep` would decline every datagram. The
        fast path reports back through `lockstep_advanced`."""
        if self._next_ack is None:
            return None
        return self._last_sent, self.last_block, self._lockstep_until

    def lockstep_advanced(self, last_sent: int, now: float) -> None:
        """A fast path answered ACKs in `lockstep`'s place up to DATA `last_sent`, the last
        one at `now`: the state moves on as that many `lockstep` calls would have moved it."""
        if self._next_ack is None or not self._last_sent < last_sent <= self.last_block:
            raise ValueError(f"block {last_sent} is outside the lock-step window")
        self._acked = last_sent - 1
        self._tries = 0
        self._last_sent = last_sent
        self.deadline = now + self.timeout
        self._next_ack = _HEADER.pack(Opcode.ACK, last_sent & 0xFFFF)

    def tick(self, now: float) -> list[bytes]:
        """Retransmit what is unacknowledged once `deadline` has passed; give up after
        `retries` attempts."""
        if self._state is _State.DONE or now < self.deadline:
            return []
        if now >= self.expires:
            return self._expire()
        if self._tries >= self.retries:
            what = "OACK" if self._state is _State.OACK_SENT else f"block {self._acked + 1}"
            self._finish(Outcome.FAILED, f"no answer to {what} after {self._tries} retries")
            return []
        self._tries += 1
        self.retransmits += 1
        if self._state is _State.OACK_SENT:
            self._arm(now)
            return [encode_oack(self.options.acknowledged)]
        return self._send_window(self._acked + 1, now)

    def cancel(self, reason: str) -> list[bytes]:
        """Stop now (server shutting down); returns the ERROR to tell the client."""
        if self._state is _State.DONE:
            return []
        self._finish(Outcome.FAILED, reason)
        return [encode_error(ErrorCode.NOT_DEFINED, reason)]

    def client_gone(self, reason: str) -> None:
        """The client's port is closed (ICMP port unreachable). Right after an OACK that is
        a client that only wanted the size, like EDK2's probe: aborted, not failed."""
        if self._state is not _State.DONE:
            outcome = Outcome.ABORTED if self._state is _State.OACK_SENT else Outcome.FAILED
            self._finish(outcome, reason)

    def _on_ack(self, wire_block: int, now: float) -> list[bytes]:
        state = self._state
        if now >= self.expires and state is not _State.DONE:
            # A client that keeps ACKing, just too slowly, never lets the timer fire.
            return self._expire()
        if state is _State.SENDING:
            # The one block in (acked, last_sent] with these low 16 bits; windows are far
            # smaller than 65536 blocks, so the match is unique.
            block = self._last_sent - ((self._last_sent - wire_block) & 0xFFFF)
            if block <= self._acked:
                # A duplicate or stale ACK. Answering it would send everything twice from
                # here on (the sorcerer's apprentice bug); the timer handles real loss.
                return []
            self._acked = block
            self._tries = 0
            if block >= self.last_block:
                self._finish(Outcome.COMPLETED, "")
                return []
            # An ACK inside the window means the client saw a gap after `block` (RFC 7440):
            # the next window starts right after it.
            return self._send_window(block + 1, now)
        if state is _State.OACK_SENT and wire_block == 0:
            self._state = _State.SENDING
            self._tries = 0
            return self._send_window(1, now)
        return []

    def _send_window(self, first: int, now: float) -> list[bytes]:
        last = min(first + self.windowsize - 1, self.last_block)
        self._last_sent = last
        self._arm(now)
        if self.windowsize == 1:
            self._next_ack = _HEADER.pack(Opcode.ACK, last & 0xFFFF)
        return [self._data_packet(block) for block in range(first, last + 1)]

    def _data_packet(self, block: int) -> bytes:
        packets = self._packets
        index = block - self._chunk_first
        if packets is None or index < 0 or index >= len(packets):
            # Chunks are aligned to block numbers so a rewind by a window re-reads little.
            first = self._chunk_first = block - (block - 1) % self._chunk_blocks
            blksize, pack, data = self.blksize, _HEADER.pack, Opcode.DATA
            count = min(self._chunk_blocks, self.last_block - first + 1)
            chunk = self._read_at((first - 1) * blksize, self._chunk_blocks * blksize)
            packets = self._packets = [
                pack(data, (first + i) & 0xFFFF) + chunk[i * blksize : (i + 1) * blksize]
                for i in range(count)
            ]
            index = block - first
        return packets[index]

    def _arm(self, now: float) -> None:
        deadline = now + self.timeout
        self.deadline = deadline if deadline < self.expires else self.expires

    def _expire(self) -> list[bytes]:
        self.expired = True
        self._finish(Outcome.FAILED, f"transfer deadline of {self.max_seconds:g} s passed")
        return [encode_error(ErrorCode.NOT_DEFINED, DEADLINE_MESSAGE)]

    def _finish(self, outcome: Outcome, reason: str) -> None:
        self._state = _State.DONE
        self.outcome = outcome
        self.reason = reason
        self.deadline = float("inf")
        self._packets = None
        self._next_ack = None


def _describe(error: Error) -> str:
    return f"{error.code} {error.message!r}" if error.message else str(error.code)


# ---------------------------------------------------------------------------------------
# Admission: who gets a session when requests outnumber what the server will carry


@dataclass(frozen=True)
class AdmissionLimits:
    """How many transfers at once, per client and in all, and how stalled is evictable."""

    max_sessions: int = 64
    # Per source address: a booting machine needs one transfer (two with EDK2's size
    # probe); four leave room for retries while one address cannot take the server.
    per_client: int = 4
    # Slots only a client with no transfer yet may take: once the server is that close to
    # full, addresses already being served wait, so a machine starting to boot gets in.
    reserve: int = 8
    # A transfer whose client confirmed nothing new for this long may be evicted to make
    # room for a new client. On a LAN an ACK takes well under a millisecond and the
    # retransmission timer is 1 s, so a second of silence is a client that is not there.
    stall_after: float = 1.0


@dataclass(frozen=True)
class SessionView:
    """What admission needs to know of one admitted transfer."""

    key: int
    client: str  # source address
    progressed_at: float  # when its client last confirmed new bytes (admission time at first)
    bytes_acknowledged: int


class Verdict(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"


# Why a request was refused: TFTP error messages and metric labels at once.
REFUSED_PER_CLIENT = "too many sessions"
REFUSED_BUSY = "server busy, retry later"


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    reason: str = ""  # REFUSED_PER_CLIENT or REFUSED_BUSY for a refusal
    evict: int | None = None  # the key of a transfer to end first, to make room


def admit(
    client: str, sessions: Sequence[SessionView], now: float, limits: AdmissionLimits
) -> Admission:
    """Whether a new read request from `client` gets a transfer, and whom it displaces.

    1. An address already holding `per_client` transfers is refused.
    2. Below `max_sessions - reserve` everyone else is accepted.
    3. Above it, only an address with no transfer yet is accepted (the reserve is theirs).
    4. At `max_sessions`, such a new client evicts the transfer that has gone longest
       without progress (fewest bytes confirmed breaking ties), provided it has been
       stalled for `stall_after`; with none stalled, it is refused (firmware asks again).
    """
    mine = sum(1 for s in sessions if s.client == client)
    if mine >= limits.per_client:
        return Admission(Verdict.REFUSE, REFUSED_PER_CLIENT)
    total = len(sessions)
    if total < limits.max_sessions - limits.reserve:
        return Admission(Verdict.ACCEPT)
    if mine > 0:
        return Admission(Verdict.REFUSE, REFUSED_BUSY)
    if total < limits.max_sessions:
        return Admission(Verdict.ACCEPT)
    stalled = [s for s in sessions if now - s.progressed_at >= limits.stall_after]
    if not stalled:
        return Admission(Verdict.REFUSE, REFUSED_BUSY)
    victim = min(stalled, key=lambda s: (s.progressed_at, s.bytes_acknowledged, s.key))
    return Admission(Verdict.ACCEPT, evict=victim.key)
