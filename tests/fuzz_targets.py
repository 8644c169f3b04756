"""Every parser that reads bytes from the LAN, as fuzzing targets (issue 7, point 8).

One `Target` per parser: the callable taking bytes (adapted where the parser takes text
or several arguments), the error type(s) it may raise, valid documents to start from and
a hypothesis strategy that mixes

  (a) random bytes,
  (b) valid documents mutated: the fixed samples (real firmware DHCP captures from
      tests/fixtures/pcaps, packets from the TFTP encoders, catalogs and manifests signed
      with a throwaway key, rendered plans, the agent's reports, Range headers) and, for
      parsers with an encoder, valid values freshly drawn by hypothesis for each run.
      Mutations: bytes flipped, inserted, deleted, truncated, duplicated; for JSON
      documents values replaced by `1e999`, `NaN`, `"\\ud800"`, huge integers, deep
      nesting, wrong types, keys dropped, added or repeated; for line documents lines
      dropped, repeated, swapped and fields replaced by overlong or non-ASCII numbers; for
      DHCP options appended, split (RFC 3396) or overlong; for TFTP fields replaced.

The properties (tests/unit/test_fuzz.py, 10,000 examples each, and bench/fuzz.py, 10^6):
no exception but the parser's own error type escapes; what a parse returns can be used
(re-encoded, logged, verified) without an exception either; nothing allocates past
`memory_bound` (a batch of `adversarial` inputs claims sizes of gigabytes to petabytes);
valid documents round-trip through the encoder.

A parser that is not in the tree yet raises `NotBuilt` from `Target.parser()`, and the
tests skip it with that reason.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from random import Random
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

PCAPS = sorted((Path(__file__).parent / "fixtures" / "pcaps").glob("*.pcap"))
NOW = 1_800_000_000  # the clock the catalog checks use

# --- memory ------------------------------------------------------------------------------
# A parser may build objects in proportion to what it received, never in proportion to
# what the input *claims* (a bitmap of 2^34 chunks is 2 GiB, a 10^15-byte file is 1 PB).
# Proportional, for Python: the worst JSON shapes cost about 21 bytes of objects per input
# byte (`[{},{},...]`: a 64-byte dict and an 8-byte slot per 3 bytes) plus a decoded copy
# of the text and a canonical re-encoding; 64 bytes per input byte covers that three times
# over. The fixed part covers scapy's dissection of a DHCP packet (~100 KiB of layer and
# field objects, measured) and regex/enum caches. The adversarial inputs are all under
# 8 KiB, so their bound is under 1.5 MiB: an allocation by the claimed size, even one
# thousandth of it, breaks it by three orders of magnitude.
MEMORY_FIXED = 1 << 20
MEMORY_PER_INPUT_BYTE = 64


def memory_bound(input_size: int) -> int:
    return MEMORY_FIXED + MEMORY_PER_INPUT_BYTE * input_size


class NotBuilt(Exception):
    """The parser named by a target is not in the tree (yet)."""


@dataclass(frozen=True)
class Parser:
    parse: Callable[[bytes], Any]
    errors: tuple[type[BaseException], ...]
    # What the caller does next with a parsed value; may raise only `use_errors`.
    use: Callable[[Any, bytes], None] | None = None
    use_errors: tuple[type[BaseException], ...] = ()
    # An encoder: parse(encode(v)) must equal v (compared through `normal`).
    encode: Callable[[Any], bytes] | None = None
    normal: Callable[[Any], Any] = lambda value: value
    # Whether every successfully parsed value (not only valid ones) re-encodes exactly;
    # false where the parser decodes lossily on purpose (TFTP replaces non-ASCII option
    # bytes), so only drawn valid values can round-trip.
    reencode_fuzzed: bool = True


Mutator = Callable[[bytes, Random], bytes]


def seeded(mutate: Mutator, documents: SearchStrategy[bytes]) -> SearchStrategy[bytes]:
    """`mutate` applied to a drawn document with a drawn seed. Hypothesis picks the
    document and the seed; the mutation itself is plain Python. Drawing every choice
    through hypothesis costs ~0.1 ms a draw here, dozens of draws per mutant, and
    10,000 examples per parser would not fit in CI. A failure still prints the input."""
    return st.tuples(documents, st.integers(0, 2**64 - 1)).map(
        lambda pair: mutate(pair[0], Random(pair[1]))
    )


@dataclass(frozen=True)
class Target:
    name: str
    intended: str  # module:function the parser is (to be) found at
    build: Callable[[], Parser]
    samples: Callable[[], list[bytes]]  # valid documents
    mutate: Mutator  # structure-aware mutation of one document
    adversarial: Callable[[], list[bytes]]  # small inputs claiming huge sizes
    valid: Callable[[], SearchStrategy[Any]] | None = None  # values for the encoder
    max_random: int = 2048

    def parser(self) -> Parser:
        try:
            return _built(self)
        except (ImportError, AttributeError) as exc:
            raise NotBuilt(f"parser {self.name} not built yet ({self.intended}: {exc})") from None

    def strategy(self, fresh_valid: int = 200) -> SearchStrategy[bytes]:
        """Random bytes, and mutants of valid documents: the fixed samples plus (with an
        encoder) `fresh_valid` valid values drawn anew for this strategy and encoded."""
        documents = self.samples() + self.fresh_documents(fresh_valid)
        pick = st.sampled_from(documents)
        return st.one_of(
            st.binary(max_size=self.max_random),
            seeded(mutate_bytes, pick),
            seeded(self.mutate, pick),
            seeded(self._maybe_mutate, pick),
        )

    def fresh_documents(self, count: int) -> list[bytes]:
        """`count` valid values drawn by hypothesis and encoded. Drawn up front: one
        valid value costs 5-10 times a mutant to draw, and drawn per example they made
        up most of the examples (hypothesis's one_of is far from uniform in practice)."""
        parser = self.parser()
        if self.valid is None or parser.encode is None or count == 0:
            return []
        encode, documents = parser.encode, []

        @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(self.valid())
        def collect(value: Any) -> None:
            documents.append(encode(value))

        collect()
        return documents

    def _maybe_mutate(self, document: bytes, rng: Random) -> bytes:
        """The document as it is, or mutated in structure and then maybe in bytes."""
        if rng.random() < 0.3:
            return document
        mutant = self.mutate(document, rng)
        return mutate_bytes(mutant, rng) if rng.random() < 0.5 else mutant


@cache
def _built(target: Target) -> Parser:
    return target.build()


def check(parser: Parser, data: bytes) -> Any:
    """The properties for one input: only the parser's error escapes the parse, only the
    documented errors escape what the caller does next, and a parsed value re-encodes to
    itself. Returns the parsed value (None when refused); raises on a violation."""
    try:
        value = parser.parse(data)
    except parser.errors:
        return None
    if parser.use is not None:
        try:
            parser.use(value, data)
        except parser.use_errors:
            pass
    if parser.encode is not None and parser.reencode_fuzzed:
        again = parser.parse(parser.encode(value))
        assert parser.normal(again) == parser.normal(value), "re-encoding changed the value"
    return value


def traced_peak(parser: Parser, data: bytes) -> int:
    """Bytes allocated at the peak of one parse (and its use), over what was held before.
    Errors are swallowed here; `check` is where they count."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            check(parser, data)
        except Exception:
            pass
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


# --- byte-level mutation -----------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x0D, 0x20, 0x22, 0x2C, 0x3A)
# Text for values and keys: ASCII, separators, controls, non-ASCII, lone surrogates.
TEXT_POOL = (
    "abcxyz019 _-.:/=,\"\\\x00\x1b\t\n\r\x7f\x85\u00e9\u20ac\u2028\ufeff\U0001f600\ud800\udcff"
)
TOKENS = (
    b"\xed\xa0\x80",  # a UTF-8-encoded lone surrogate
    b"\xff\xfe",
    b"\\ud800",
    b"1e999",
    b"NaN",
    b"-1",
    b"9" * 5000,
    b"\x00" * 64,
    b"\r\n",
    b"\x85",
    b"[" * 2000,
)


def rand_text(rng: Random, longest: int) -> str:
    return "".join(rng.choice(TEXT_POOL) for _ in range(rng.randint(0, longest)))


def mutate_bytes(base: bytes, rng: Random) -> bytes:
    """1-4 of: a bit flipped, a byte set to a boundary value, bytes or a hostile token
    inserted, a slice deleted, duplicated or overwritten, the tail cut off."""
    data = bytearray(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 4:
            del data[pos : pos + rng.randint(1, 64)]
        elif op == 5:
            del data[pos:]
        elif op == 6:
            end = min(len(data), pos + rng.randint(1, 256))
            data[end:end] = data[pos:end]
        else:
            chunk = rng.randbytes(rng.randint(1, 8))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


# --- JSON-level mutation -----------------------------------------------------------------


class Raw(str):
    """JSON text inserted verbatim (what json.dumps cannot write: 1e999, NaN, \\ud800)."""


class Pairs(list):
    """A JSON object as (key, value) pairs, so a key can be repeated."""


HOSTILE_JSON = tuple(
    Raw(t)
    for t in (
        "1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"\\ud800"', '"a\\udfffb"',
        '"\\u0000"', "18446744073709551616", "9223372036854775808", "-9223372036854775809",
        "17179869184", "1000000000000000", "1" + "0" * 30, "9" * 5000, "-1", "0", "-0",
        "1.5", "1e308", "4e-324", "true", "false", "null", "[]", "{}", '""', '"x"',
        "[" * 40 + "]" * 40, '{"a":' * 40 + "1" + "}" * 40, "[" * 3000 + "]" * 3000,
        "[" + ",".join(["0"] * 5000) + "]", '"' + "A" * 20000 + '"',
    )
)  # fmt: skip
HOSTILE_KEYS = (Raw('"\\ud800"'), "", "x" * 200, "\u0000", "__proto__")


def _pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return Pairs([k, _pairs(v)] for k, v in value.items())
    if isinstance(value, list):
        return [_pairs(v) for v in value]
    return value


def _containers(value: Any, out: list) -> list:
    if isinstance(value, Pairs):
        out.append(value)
        for pair in value:
            _containers(pair[1], out)
    elif isinstance(value, list):
        out.append(value)
        for item in value:
            _containers(item, out)
    return out


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{dump_key(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def dump_key(key: str) -> str:
    return str(key) if isinstance(key, Raw) else json.dumps(key)


def json_scalar(rng: Random) -> Any:
    kind = rng.randrange(8)
    if kind < 3:
        return rng.choice(HOSTILE_JSON)
    if kind == 3:
        return rng.choice([rng.randint(-10, 300), rng.randint(-(2**70), 2**70)])
    if kind == 4:
        return rng.uniform(-1e300, 1e300)
    if kind == 5:
        return rand_text(rng, 20)
    return rng.choice([True, False, None, [], {}])


def mutate_json(base: bytes, rng: Random) -> bytes:
    """A JSON document with 1-4 values replaced (by 1e999, NaN, "\\ud800", huge integers,
    deep nesting, wrong types), entries dropped, added or repeated (a repeated key)."""
    tree = _pairs(json.loads(base))
    for _ in range(rng.randint(1, 4)):
        containers = _containers(tree, [])
        if not containers:
            tree = json_scalar(rng)
            break
        box = rng.choice(containers)
        op = rng.randrange(4)
        if not box or op == 3:  # add an entry
            if isinstance(box, Pairs):
                key = rng.choice(HOSTILE_KEYS) if rng.random() < 0.5 else rand_text(rng, 8)
                box.append([key, json_scalar(rng)])
            else:
                box.append(json_scalar(rng))
        elif op == 0:  # replace a value
            i = rng.randrange(len(box))
            if isinstance(box, Pairs):
                box[i][1] = json_scalar(rng)
            else:
                box[i] = json_scalar(rng)
        elif op == 1:  # drop an entry
            del box[rng.randrange(len(box))]
        else:  # repeat an entry (a repeated key: the last one wins in json.loads)
            i = rng.randrange(len(box))
            item = box[i]
            box.insert(i + 1, [item[0], json_scalar(rng)] if isinstance(box, Pairs) else item)
    return dump(tree).encode("utf-8", "surrogatepass")


# --- line-level mutation (the plan) -------------------------------------------------------

HOSTILE_FIELDS = (
    "", "-1", "0", "9" * 5000, "9" * 30, "1e999", "nan", "\ud800", "١٢٣", "²", "1_000",
    "+5", " 7", "0x10", "\x00", "\x85", "\u2028", "a" * 70, "0,0,0", ",", "zero",
)  # fmt: skip


def mutate_lines(base: bytes, rng: Random) -> bytes:
    """A line-based document with lines dropped, repeated or swapped, and space-separated
    fields replaced, added or removed (overlong, negative and non-ASCII numbers)."""
    lines = base.decode("utf-8", "surrogateescape").split("\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        op = rng.randrange(5)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op in (2, 3):
            fields = lines[i].split(" ")
            if op == 2:
                j = rng.randrange(len(fields))
                fields[j] = rng.choice(HOSTILE_FIELDS) if rng.random() < 0.7 else rand_text(rng, 10)
            elif rng.random() < 0.5 and len(fields) > 1:
                del fields[-1]
            else:
                fields.append(rng.choice(HOSTILE_FIELDS))
            lines[i] = " ".join(fields)
        else:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        lines = lines or [""]
    return rng.choice(["\n", "\r\n", "\n\n"]).join(lines).encode("utf-8", "surrogatepass")


# --- DHCP --------------------------------------------------------------------------------


def read_pcap(path: Path) -> list[bytes]:
    """UDP payloads of a classic little-endian Ethernet/IPv4 pcap (what tcpdump -w wrote)."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack("<IHHiIII", data[:24])
    if magic != 0xA1B2C3D4 or linktype != 1:
        raise ValueError(f"{path}: not a little-endian Ethernet pcap")
    payloads, i = [], 24
    while i + 16 <= len(data):
        _, _, caplen, _ = struct.unpack("<IIII", data[i : i + 16])
        frame = data[i + 16 : i + 16 + caplen]
        i += 16 + caplen
        if frame[12:14] != b"\x08\x00" or frame[23] != 17:  # IPv4, UDP
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl :]
        length = struct.unpack("!H", udp[4:6])[0]
        payloads.append(bytes(udp[8:length]))
    return payloads


@cache
def dhcp_samples() -> list[bytes]:
    # Client requests only (replies are one flipped byte away: the parser refuses them).
    return sorted({p for path in PCAPS for p in read_pcap(path) if p[:1] == b"\x01"})


def _dhcp_options_end(packet: bytes) -> int:
    """Where option 255 (end) sits, or the packet's length."""
    i = 240
    while i < len(packet):
        code = packet[i]
        if code == 255:
            return i
        i += 1 if code == 0 else 2 + (packet[i + 1] if i + 1 < len(packet) else 0)
    return len(packet)


def mutate_dhcp(base: bytes, rng: Random) -> bytes:
    """A captured request with options appended, repeated (RFC 3396) or overlong, and
    now and then its fixed header mutated too."""
    packet = bytearray(base)
    end = _dhcp_options_end(packet)
    extra = bytearray()
    for _ in range(rng.randint(1, 6)):
        code = rng.choice([43, 53, 57, 60, 61, 77, 93, 97, 175, 50, 54, 0, 255])
        kind = rng.randrange(4)
        if kind == 0:
            value = rng.randbytes(rng.randint(0, 255))
            extra += bytes([code, len(value)]) + value
        elif kind == 1:  # a length running past the end
            extra += bytes([code, 255]) + rng.randbytes(rng.randint(0, 8))
        elif kind == 2:  # one option split into many (RFC 3396 concatenation)
            value = rng.choice([b"9" * 255, b"PXEClient:Arch:", b"\x00\x07", b"iPXE"])
            extra += (bytes([code, len(value)]) + value) * rng.randint(1, 40)
        else:
            extra += bytes([code])
    packet[end:end] = extra
    if rng.random() < 0.5:
        packet[:240] = mutate_bytes(bytes(packet[:240]), rng)[:240].ljust(240, b"\0")
    return bytes(packet)


def _dhcp_adversarial() -> list[bytes]:
    base = dhcp_samples()[0]
    end = _dhcp_options_end(base)
    header = base[:240]

    def split(code: int, value: bytes) -> bytes:  # RFC 3396: one long option as many
        return b"".join(bytes([code, len(value[i : i + 255])]) + value[i : i + 255]
                        for i in range(0, len(value), 255))  # fmt: skip

    return [
        # The architecture parsed out of "PXEClient:Arch:<1,200 digits>" (split option 60).
        header + bytes([53, 1, 1]) + split(60, b"PXEClient:Arch:" + b"9" * 1200) + b"\xff",
        # ... and out of 4,400 digits, past the request cap (refused by size).
        header + bytes([53, 1, 1]) + split(60, b"PXEClient:Arch:" + b"9" * 4400) + b"\xff",
        # Option 43 of sub-options each claiming 255 bytes; max message size 65535.
        base[:end] + bytes([57, 2, 0xFF, 0xFF, 43, 255]) + b"\x47\xff" * 127 + b"\0\xff",
        # 400 option 77 fragments: one user class list joined from all of them.
        header + bytes([53, 1, 1]) + bytes([77, 1, 4]) * 400 + b"\xff",
        # Every option present at its largest, up to the cap.
        header + b"".join(bytes([c, 255]) + bytes(255) for c in (43, 60, 77, 97)) + b"\xff",
    ]


def _dhcp_build() -> Parser:
    from pxe.dhcp import MalformedPacket, parse_client

    def use(info: Any, _data: bytes) -> None:
        info.log_fields()  # logged outside the decision's try block in dhcp_server

    return Parser(parse_client, (MalformedPacket,), use=use)


# --- TFTP --------------------------------------------------------------------------------


def _tftp_build() -> Parser:
    from pxe import tftp

    limits = tftp.ServerLimits()

    def use(packet: Any, _data: bytes) -> None:
        # A request's options are negotiated straight away: the grant stays within the
        # server's caps whatever the client claims (blksize 65464, windowsize 65535).
        if isinstance(packet, tftp.Request):
            granted = tftp.negotiate(packet.options, 10**15, limits)
            assert tftp.MIN_BLKSIZE <= granted.blksize <= limits.blksize_cap, granted
            assert 1 <= granted.windowsize <= limits.windowsize_cap, granted
            assert 0 < granted.timeout <= tftp.MAX_TIMEOUT, granted

    def encode(packet: Any) -> bytes:
        if isinstance(packet, tftp.Request):
            return tftp.encode_request(
                packet.filename, packet.mode, packet.options, opcode=packet.opcode
            )
        if isinstance(packet, tftp.Data):
            return tftp.encode_data(packet.block, packet.payload)
        if isinstance(packet, tftp.Ack):
            return tftp.encode_ack(packet.block)
        if isinstance(packet, tftp.Error):
            return tftp.encode_error(packet.code, packet.message)
        return tftp.encode_oack(packet.options)

    return Parser(tftp.parse_packet, (tftp.MalformedPacket,), use=use, encode=encode,
                  reencode_fuzzed=False)  # fmt: skip


_ascii_field = st.text(
    st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=20
)
_tftp_option_names = st.one_of(
    st.sampled_from(["blksize", "tsize", "timeout", "windowsize"]),
    _ascii_field.map(str.lower),
)
_tftp_option_values = st.one_of(
    st.sampled_from(["65464", "65535", "0", "255", "1000000000000000", "9" * 300, "-1"]),
    st.integers(0, 2**64).map(str),
    _ascii_field,
)


def _tftp_valid() -> SearchStrategy[Any]:
    from pxe import tftp

    options = st.dictionaries(_tftp_option_names, _tftp_option_values, max_size=6)
    filenames = st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b)
    return st.one_of(
        st.builds(
            tftp.Request,
            st.sampled_from([tftp.Opcode.RRQ, tftp.Opcode.WRQ]),
            filenames.map(lambda b: b.decode("utf-8", "surrogateescape")),
            st.sampled_from(["octet", "netascii"]),
            options,
        ),
        st.builds(tftp.Data, st.integers(0, 0xFFFF), st.binary(max_size=1468)),
        st.builds(tftp.Ack, st.integers(0, 0xFFFF)),
        st.builds(tftp.Error, st.integers(0, 0xFFFF), st.text(
            st.characters(min_codepoint=1, max_codepoint=127), max_size=40)),
        st.builds(tftp.OptionAck, options),
    )  # fmt: skip


@cache
def tftp_samples() -> list[bytes]:
    from pxe import tftp

    edk2 = {"blksize": "1468", "tsize": "0", "windowsize": "4", "timeout": "1"}
    return [
        tftp.encode_request("undionly.kpxe", "octet", {"blksize": "1432", "tsize": "0"}),
        tftp.encode_request("snponly.efi", "octet", edk2),
        tftp.encode_request("boot/x.efi", "netascii"),
        tftp.encode_request("up.bin", "octet", opcode=tftp.Opcode.WRQ),
        tftp.encode_data(1, b"\x55" * 512),
        tftp.encode_data(65535, b""),
        tftp.encode_ack(0),
        tftp.encode_ack(65535),
        tftp.encode_error(tftp.ErrorCode.OPTION_REFUSED, "TFTP Aborted"),
        tftp.encode_oack({"blksize": "1468", "tsize": "1000"}),
    ]


TFTP_FIELDS = (
    b"blksize", b"tsize", b"timeout", b"windowsize", b"BLKSIZE", b"65464", b"65535", b"0",
    b"255", b"1000000000000000", b"9" * 300, b"-1", b"octet", b"netascii", b"mail", b"",
    b"\xff\xfe", b"../../etc/passwd",
)  # fmt: skip


def mutate_tftp(base: bytes, rng: Random) -> bytes:
    """A packet whose NUL-separated fields are replaced, dropped or repeated, under any
    opcode."""
    fields = base[2:].split(b"\0")
    opcode = rng.choice([b"\0\1", b"\0\2", b"\0\3", b"\0\4", b"\0\5", b"\0\6", b"\0\7"])
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(fields))
        op = rng.randrange(3)
        if op == 0:
            fields.insert(i, rng.choice(TFTP_FIELDS))
        elif op == 1 and fields:
            del fields[min(i, len(fields) - 1)]
        else:
            fields.insert(i, rng.randbytes(rng.randint(0, 12)))
    return opcode + b"\0".join(fields)


def _tftp_adversarial() -> list[bytes]:
    from pxe import tftp

    huge = {"blksize": "65464", "windowsize": "65535", "timeout": "255",
            "tsize": "1000000000000000"}  # fmt: skip
    many = {f"o{i}": "9" * 8 for i in range(2000)}
    return [
        tftp.encode_request("ipxe.efi", "octet", huge),
        tftp.encode_request("ipxe.efi", "octet", {"blksize": "9" * 4000}),
        tftp.encode_request("ipxe.efi", "octet", many),
        tftp.encode_oack(huge),
        tftp.encode_data(1, b"\0" * 4000),
        b"\0\5\xff\xff" + b"\xff" * 4000,
    ]


# --- signed documents: a throwaway publisher key --------------------------------------------


@cache
def throwaway_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from imaging.signing import SigningKey

    return SigningKey(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz").digest()))


def _hex64(seed: object) -> str:
    return hashlib.sha256(repr(seed).encode()).hexdigest()


# Free text as the signed documents allow it (printable: no control, format or separator
# characters but the space).
_texts = st.text(min_size=1, max_size=40).filter(str.isprintable)
_hex64s = st.binary(min_size=32, max_size=32).map(bytes.hex)


# --- catalog -----------------------------------------------------------------------------


def _catalog_build() -> Parser:
    from imaging.catalog import CatalogError, CatalogRejected, SignedCatalog, accept_catalog
    from imaging.signing import TrustedKeys

    trusted = TrustedKeys([throwaway_key().public_key])

    def use(signed: Any, _data: bytes) -> None:
        # What the site does next: check it, then rank its entries.
        signed.catalog.by_priority()
        accept_catalog(signed, trusted, None, NOW)

    return Parser(
        SignedCatalog.from_bytes,
        (CatalogError,),
        use=use,
        use_errors=(CatalogRejected,),
        encode=lambda signed: signed.to_bytes(),
    )


def _catalog_valid() -> SearchStrategy[Any]:
    from imaging import catalog as module
    from imaging.catalog import Catalog, CatalogEntry, SignedCatalog

    max_serial = getattr(module, "MAX_SERIAL", 2**53 - 1)
    entry = st.builds(
        CatalogEntry,
        name=_texts,
        version=_texts,
        manifest_id=_hex64s,
        priority=st.integers(-1000, 1000),
        paused=st.booleans(),
        replicas=st.integers(0, 1000),
    )
    catalog = st.builds(
        Catalog,
        serial=st.integers(1, max_serial),
        issued=st.integers(0, NOW),
        expires=st.integers(NOW, NOW + 10**8),
        entries=st.lists(entry, max_size=6, unique_by=lambda e: e.name).map(tuple),
    )
    return catalog.map(lambda c: SignedCatalog.sign(c, throwaway_key()))


@cache
def catalog_samples() -> list[bytes]:
    from imaging.catalog import Catalog, CatalogEntry, SignedCatalog

    entries = (
        CatalogEntry("demo-os", "1", _hex64("demo"), priority=2),
        CatalogEntry("imager", "2024.1", _hex64("imager"), paused=True, replicas=2),
    )
    out = []
    for n in range(3):
        catalog = Catalog(serial=n + 1, issued=NOW - 60, expires=NOW + 86400,
                          entries=entries[:n])  # fmt: skip
        out.append(SignedCatalog.sign(catalog, throwaway_key()).to_bytes())
    return out


def _catalog_adversarial() -> list[bytes]:
    key = throwaway_key()
    sig = [{"ed25519": base64.b64encode(key.sign(b"x")).decode(), "key_id": key.key_id}]
    entry = {"manifest_id": _hex64(1), "name": "x", "paused": False, "priority": 0,
             "replicas": 10**18, "version": "1"}  # fmt: skip
    docs = [
        {"format": "pxepeer-catalog/1", "serial": 2**63, "issued": 0, "expires": 10**15,
         "images": [entry]},
        {"format": "pxepeer-catalog/1", "serial": 1, "issued": 0, "expires": 10**15,
         "images": [entry] * 40},
    ]  # fmt: skip
    out = [json.dumps({"catalog": d, "signatures": sig}).encode() for d in docs]
    out.append(b'{"catalog": ' + b"[" * 3000 + b"]" * 3000 + b', "signatures": []}')
    return out


# --- manifest ----------------------------------------------------------------------------


def _manifest_build() -> Parser:
    from imaging.manifest import ManifestError, SignedManifest
    from imaging.signing import SignatureError, TrustedKeys

    trusted = TrustedKeys([throwaway_key().public_key])

    def use(signed: Any, _data: bytes) -> None:
        # What a peer does next: name it, verify it, list the chunks it will fetch.
        manifest = signed.manifest
        _ = manifest.manifest_id, manifest.total_size
        manifest.chunk_refs()
        for entry in manifest.files:
            entry.offsets()
        signed.verify(trusted)

    return Parser(
        SignedManifest.from_bytes,
        (ManifestError,),
        use=use,
        use_errors=(SignatureError,),
        encode=lambda signed: signed.to_bytes(),
        # Manifest.extra is left out of ==; the canonical bytes hold all of it.
        normal=lambda signed: (signed, signed.manifest.canonical_bytes),
    )


def _manifest_valid() -> SearchStrategy[Any]:
    from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest, SignedManifest

    @st.composite
    def manifest(draw: st.DrawFn) -> Any:
        chunk_size = draw(st.sampled_from([4096, 1 << 20, 1 << 22]))
        roles = draw(st.lists(st.sampled_from(["kernel", "initrd", "disk", "boot.wim"]),
                              unique=True, min_size=1, max_size=4))  # fmt: skip
        files = []
        for role in roles:
            # Cut as imaging/chunking cuts: every chunk full but the last.
            size = draw(st.integers(0, 6 * chunk_size))
            count = -(-size // chunk_size)
            sizes = [chunk_size] * (count - 1) + [size - (count - 1) * chunk_size] * (count > 0)
            chunks = tuple(ChunkRef(draw(_hex64s), n, draw(st.booleans())) for n in sizes)
            files.append(FileEntry(role, size, draw(_hex64s), chunks))
        kernel = "kernel" if "kernel" in roles and draw(st.booleans()) else None
        initrd = "initrd" if "initrd" in roles and draw(st.booleans()) else None
        cmdline = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
        boot = BootSpec(draw(st.sampled_from(list(ImageKind))), kernel, initrd, cmdline)
        return Manifest(
            name=draw(_texts), version=draw(_texts), boot=boot, files=tuple(files),
            chunk_size=chunk_size, created=draw(st.sampled_from(["", "2024-05-01T10:00:00Z"])),
        )  # fmt: skip

    return manifest().map(lambda m: SignedManifest.sign(m, throwaway_key()))


def _sample_manifests() -> list[Any]:
    from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest

    def entry(role: str, sizes: list[int], zero: tuple[int, ...] = ()) -> FileEntry:
        chunks = tuple(ChunkRef(_hex64((role, i)), s, i in zero) for i, s in enumerate(sizes))
        return FileEntry(role, sum(sizes), _hex64(role), chunks)

    linux = Manifest(
        "demo-os", "1", BootSpec(ImageKind.LINUX, "kernel", "initrd", "console=ttyS0 quiet"),
        (entry("kernel", [4 << 20, 1000]), entry("initrd", [4 << 20, 4 << 20, 17])),
        created="2024-05-01T10:00:00Z",
    )  # fmt: skip
    disk = Manifest("disk-image", "2", BootSpec(ImageKind.DISK),
                    (entry("disk", [4 << 20] * 5 + [512], zero=(1, 3)),))  # fmt: skip
    return [linux, disk]


@cache
def manifest_samples() -> list[bytes]:
    from imaging.manifest import SignedManifest

    return [SignedManifest.sign(m, throwaway_key()).to_bytes() for m in _sample_manifests()]


def _manifest_adversarial() -> list[bytes]:
    doc = json.loads(manifest_samples()[1])
    disk = doc["manifest"]["files"][0]
    # One chunk claiming a 10^15-byte (1 PB) file.
    disk["size"] = 10**15
    disk["chunks"] = [{"sha256": _hex64("big"), "size": 10**15}]
    out = [json.dumps(doc).encode()]
    doc["manifest"]["chunk_size"] = 2**62
    out.append(json.dumps(doc).encode())
    # A million-chunk claim in a document of 6 KB: chunk sizes summing to 10^15.
    disk["chunks"] = [{"sha256": _hex64(i), "size": 10**13, "zero": True} for i in range(100)]
    disk["size"] = 10**15
    out.append(json.dumps(doc).encode())
    return out


# --- plan --------------------------------------------------------------------------------


def _plan_build() -> Parser:
    from imaging.plan import Plan, PlanError

    def parse(data: bytes) -> Any:
        # The plan is text; bytes that are not UTF-8 reach it as lone surrogates.
        return Plan.parse(data.decode("utf-8", "surrogateescape"))

    return Parser(parse, (PlanError,),
                  encode=lambda plan: plan.render().encode("utf-8", "surrogateescape"))  # fmt: skip


_plan_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r\t\0 "),
    min_size=1, max_size=24,
)  # fmt: skip


def _plan_valid() -> SearchStrategy[Any]:
    from imaging.plan import Plan, PlanChunk

    @st.composite
    def plan(draw: st.DrawFn) -> Any:
        peers = tuple(
            f"http://10.{a}.{b}.{c}:{port}"
            for a, b, c, port in draw(st.lists(
                st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 254),
                          st.integers(1, 65535)), unique=True, max_size=4))
        )  # fmt: skip
        chunks, offset = [], 0
        for _ in range(draw(st.integers(0, 8))):
            size = draw(st.integers(1, 1 << 22))
            zero = not peers or draw(st.booleans())
            order = () if zero else tuple(draw(st.permutations(range(len(peers))))[
                : draw(st.integers(1, len(peers)))])  # fmt: skip
            chunks.append(PlanChunk(offset, size, draw(_hex64s), zero, order))
            offset += size
        name = draw(st.lists(_plan_text, min_size=1, max_size=3).map(" ".join))
        return Plan(draw(_hex64s), name, draw(_plan_text), offset, draw(_hex64s),
                    draw(st.sampled_from([1 << 22, 4096])), peers, tuple(chunks))  # fmt: skip

    return plan()


@cache
def plan_samples() -> list[bytes]:
    from imaging.plan import build_plan

    disk = _sample_manifests()[1]
    peers = ["http://10.77.0.2:8080", "http://10.77.0.3:8080", "http://[fd00::3]:8080"]
    holders = {i: peers[i % 3 :] + peers[: i % 3] for i in range(6)}
    return [build_plan(disk, holders).render().encode(), build_plan(disk, {
        i: peers[:1] for i in range(6)}).render().encode()]  # fmt: skip


def _plan_adversarial() -> list[bytes]:
    sha = _hex64(0)
    return [
        f"pxepeer-plan 1\nimage {sha} 1 x\ndisk {10**15} {sha}\nchunk_size {2**62}\n"
        f"peer 0 http://10.0.0.1:8080\nchunk 0 {10**15} {sha} 0\nend 1\n".encode(),
        f"pxepeer-plan 1\nimage {sha} 1 x\ndisk 1 {sha}\nchunk_size 1\nend {10**18}\n".encode(),
        (f"pxepeer-plan 1\nimage {sha} 1 x\ndisk 1 {sha}\nchunk_size 1\n"
         + f"chunk 0 1 {sha} " + ",".join(["0"] * 2000) + "\nend 1\n").encode(),
        f"pxepeer-plan 1\npeer {10**18} http://a\nend 0\n".encode(),
    ]


# --- hello and have-notice (peer/core/wire.py) --------------------------------------------


def _hello_build() -> Parser:
    wire = importlib.import_module("peer.core.wire")

    def use(hello: Any, _data: bytes) -> None:
        # The status page and the next heartbeat re-encode what was heard.
        json.dumps(hello.to_json()).encode()
        hello.candidate()
        _ = hello.endpoint

    return Parser(
        wire.parse_hello,
        (wire.WireError,),
        use=use,
        encode=lambda hello: json.dumps(hello.to_json()).encode(),
        normal=lambda hello: hello.to_json(),
    )


def _hello_valid() -> SearchStrategy[Any]:
    wire = importlib.import_module("peer.core.wire")

    @st.composite
    def bitmap(draw: st.DrawFn) -> Any:
        size = draw(st.integers(0, 3000))
        bits = bytearray(draw(st.binary(min_size=(size + 7) // 8, max_size=(size + 7) // 8)))
        if size % 8:
            bits[-1] &= (0xFF << (8 - size % 8)) & 0xFF
        return wire.ChunkBitmap(size, bits)

    addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
        lambda a: not (a.is_multicast or a.is_unspecified)
    ).map(str)
    return st.builds(
        wire.Hello,
        node_id=st.binary(min_size=8, max_size=8).map(bytes.hex),
        site=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                     max_size=64),
        address=addresses,
        http_port=st.integers(1, 65535),
        started=st.floats(0, 1e11, exclude_max=True),
        can_answer_pxe=st.booleans(),
        catalog_serial=st.integers(0, 2**63 - 1),
        wan_ok=st.booleans(),
        holdings=st.dictionaries(_hex64s, bitmap(), max_size=3),
        wants=st.lists(_hex64s, max_size=3),
        counters=st.dictionaries(st.text(max_size=40), st.integers(0, 2**63 - 1), max_size=4),
        fetching=st.lists(_hex64s, max_size=3),
        offers_seen=st.one_of(st.none(), st.booleans()),
    )  # fmt: skip


@cache
def hello_samples() -> list[bytes]:
    wire = importlib.import_module("peer.core.wire")
    bitmap = wire.ChunkBitmap(13)
    for i in (0, 3, 12):
        bitmap.set(i)
    hellos = [
        wire.Hello(node_id="0123456789abcdef", site="store-42", address="10.77.0.2",
                   http_port=8080, started=1_700_000_000.25, can_answer_pxe=True,
                   catalog_serial=7, wan_ok=True, holdings={_hex64("a"): bitmap},
                   wants=[_hex64("b")], counters={"served": 12, "strikes": 0},
                   fetching=[_hex64("c")], offers_seen=True),
        wire.Hello(node_id="fedcba9876543210", site="s", address="fd00::3", http_port=1,
                   started=0.0, can_answer_pxe=False),
    ]  # fmt: skip
    return [json.dumps(h.to_json()).encode() for h in hellos]


def _hello_adversarial() -> list[bytes]:
    doc = json.loads(hello_samples()[0])
    out = []
    for claim in (2**34, 2**20, 2**40):  # 2 GiB, 128 KiB, 128 GiB of bitmap claimed
        doc["holdings"] = {_hex64("a"): f"{claim}:AAAA"}
        out.append(json.dumps(doc).encode())
    doc["holdings"] = {_hex64(i): f"{2**34}:" for i in range(200)}
    out.append(json.dumps(doc).encode())
    doc["holdings"] = {}
    doc["counters"] = {str(i): 2**63 - 1 for i in range(32)}
    doc["started"] = 1e308
    out.append(json.dumps(doc).encode())
    return out


def _have_build() -> Parser:
    wire = importlib.import_module("peer.core.wire")
    def encode(notice: Any) -> bytes:
        # `gone` (chunks that left the sender's store) where the notice carries it.
        extra = {"gone": notice.gone} if hasattr(notice, "gone") else {}
        return json.dumps(wire.encode_have(notice.node_id, notice.chunks, **extra)).encode()

    return Parser(wire.parse_have, (wire.WireError,), encode=encode)


def _have_valid() -> SearchStrategy[Any]:
    wire = importlib.import_module("peer.core.wire")
    cap = getattr(wire, "MAX_CHUNKS", 1 << 20)
    chunk = st.integers(1, cap).flatmap(
        lambda size: st.tuples(_hex64s, st.integers(0, size - 1), st.just(size))
    )
    fields = {"gone": st.booleans()} if "gone" in wire.HaveNotice.__dataclass_fields__ else {}
    return st.builds(
        wire.HaveNotice,
        st.binary(min_size=8, max_size=8).map(bytes.hex),
        st.lists(chunk, max_size=8).map(tuple),
        **fields,
    )


@cache
def have_samples() -> list[bytes]:
    wire = importlib.import_module("peer.core.wire")
    notices = [[(_hex64("a"), 3, 13)], [(_hex64("a"), 0, 13), (_hex64("b"), 1023, 1024)]]
    return [json.dumps(wire.encode_have("0123456789abcdef", n)).encode() for n in notices]


def _have_adversarial() -> list[bytes]:
    node = "0123456789abcdef"
    one = {"manifest_id": _hex64("a"), "index": 2**34 - 1, "size": 2**34}
    many = [{"manifest_id": _hex64(i), "index": 0, "size": 2**34} for i in range(60)]
    return [
        json.dumps({"node_id": node, "chunks": [one]}).encode(),  # the 150-byte 4.2 GB notice
        json.dumps({"node_id": node, "chunks": many}).encode(),
        json.dumps({"node_id": node, "chunks": [{**one, "size": 10**15, "index": 0}]}).encode(),
    ]


# --- HTTP Range (peer/api/byte_range.py) --------------------------------------------------

RANGE_ETAG = '"0123456789abcdef"'
RANGE_DEFAULT_SIZE = 1 << 40


def range_input(header: str, if_range: str | None = None, size: int | None = None) -> bytes:
    """The fuzz encoding of one call: `Range` line, optional `If-Range` line, size line."""
    lines = [header.encode("utf-8", "surrogatepass")]
    if if_range is not None or size is not None:
        lines.append(b"" if if_range is None else if_range.encode("utf-8", "surrogatepass"))
    if size is not None:
        lines.append(str(size).encode())
    return b"\n".join(lines)


def range_call(data: bytes) -> tuple[str, str | None, str, int]:
    """(range header, if-range, etag, size) from a fuzz input, as aiohttp would hand them
    over: header values are decoded as UTF-8 with surrogateescape."""
    parts = data.split(b"\n", 2)
    header = parts[0].decode("utf-8", "surrogateescape")
    if_range = parts[1].decode("utf-8", "surrogateescape") if len(parts) > 1 else None
    size = RANGE_DEFAULT_SIZE
    if len(parts) > 2 and parts[2].isdigit() and len(parts[2]) <= 19:
        size = int(parts[2])
    return header, if_range or None, RANGE_ETAG, size


def _range_build() -> Parser:
    byte_range = importlib.import_module("peer.api.byte_range")

    def parse(data: bytes) -> Any:
        header, if_range, etag, size = range_call(data)
        result = byte_range.parse_range(header, if_range, etag, size)
        if result is not None:
            start, stop = result
            # Whatever the header says, the answer is a non-empty slice of the file.
            assert 0 <= start < stop <= size, (result, size)
        return result

    return Parser(parse, (byte_range.RangeNotSatisfiable,))


def _range_valid_pairs() -> SearchStrategy[tuple[bytes, tuple[int, int] | None]]:
    """(input, expected answer) for well-formed single ranges (RFC 9110 14.1.2)."""

    @st.composite
    def case(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
        size = draw(st.integers(1, 2**50))
        form = draw(st.integers(0, 2))
        if form == 0:
            start = draw(st.integers(0, size - 1))
            end = draw(st.integers(start, 2**53))
            return range_input(f"bytes={start}-{end}", None, size), (start, min(end + 1, size))
        if form == 1:
            start = draw(st.integers(0, size - 1))
            return range_input(f"bytes={start}-", RANGE_ETAG, size), (start, size)
        n = draw(st.integers(1, 2**53))
        return range_input(f"bytes=-{n}", None, size), (max(0, size - n), size)

    return case()


@cache
def range_samples() -> list[bytes]:
    return [
        range_input("bytes=0-499", None, 10_000),
        range_input("bytes=500-", RANGE_ETAG, 10_000),
        range_input("bytes=-500"),
        range_input("bytes=0-0", None, 1),
        range_input("bytes=9500-", '"other"', 10_000),
        range_input("bytes=0-", "Wed, 21 Oct 2015 07:28:00 GMT", 10),
    ]


RANGE_NUMBERS = (
    "", "9" * 5000, "١٢", "²", "1_0", "+1", " 1", "0x10", "1e3", "\ud800", "-",
    "00000000000000000000001", "18446744073709551616",
)  # fmt: skip


def mutate_range(base: bytes, rng: Random) -> bytes:
    """A Range header of 1-4 specs with odd numbers, dashes and separators, odd units,
    an If-Range that may or may not match, any size."""

    def number() -> str:
        if rng.random() < 0.6:
            return str(rng.choice([rng.randint(-5, 20_000), rng.randint(0, 2**64)]))
        return rng.choice(RANGE_NUMBERS)

    specs = [f"{number()}{rng.choice(['-', '-', '', '--', ' - '])}{number()}"
             for _ in range(rng.choice([1, 1, 2, 4]))]  # fmt: skip
    unit = rng.choice(["bytes", "bytes", "BYTES", "bits", "", "bytes "])
    header = f"{unit}={rng.choice([',', ', ', ',,']).join(specs)}"
    if_range = rng.choice([None, None, RANGE_ETAG, 'W/"0123456789abcdef"', "", "\ud800"])
    size = rng.choice([None, 0, 1, rng.randint(0, 20_000), rng.randint(0, 2**63)])
    return range_input(header, if_range, size)


def _range_adversarial() -> list[bytes]:
    return [
        range_input("bytes=0-" + str(10**15), None, 10**15),
        range_input("bytes=" + ",".join(f"{i}-{i}" for i in range(1000)), None, 10**15),
        range_input("bytes=-" + "9" * 5000),
        range_input("bytes=" + "0-1," * 1500),
    ]


# --- progress report (imaging/progress_report.py) ------------------------------------------


def _report_build() -> Parser:
    report = importlib.import_module("imaging.progress_report")
    cap = getattr(report, "MAX_COUNT", None)

    def use(parsed: Any, _data: bytes) -> None:
        # Strikes are counted from these: one report can never claim more than the cap.
        for counts in (parsed.peers_used(), parsed.corrupt_from()):
            assert cap is None or all(0 <= n <= cap for n in counts.values()), counts

    encode = getattr(report, "encode_report", None)
    return Parser(report.parse_report, (report.ReportError,), use=use,
                  encode=encode if callable(encode) else None)  # fmt: skip


@cache
def report_samples() -> list[bytes]:
    # What imaging/agent/pxepeer-agent.sh posts (key=value lines).
    manifest = _hex64("disk")
    return [
        f"state=writing\nmanifest={manifest}\nimage=demo-os 1\ndisk=/dev/vda\ntotal=6\n"
        f"done=1\nbytes=4194304\nsize=25166336\nfetched=4194304\n"
        f"peers=http://10.77.0.2:8080=1,http://10.77.0.3:8080=2\ncorrupt=\n"
        f"message=1/6 chunks\n".encode(),
        f"state=done\nmanifest={manifest}\nimage=demo-os 1\ndisk=/dev/vda\n"
        f"corrupt=http://10.77.0.3:8080=2,http://[fd00::3]:8080=1\nmessage=verified\n".encode(),
        b"state=failed\r\nmessage=no disk found\r\n",
    ]


HOSTILE_VALUES = (
    "", "9" * 5000, "9" * 17, "9007199254740993", "-1", "\u0662", "\u00b2", "1_0", "\x1b[2J",
    "\u2028", "\x85", "\ud800", "http://x=1," * 80, "http://10.0.0.1:99999=1",
    "http://10.0.0.1:8080=1,http://10.0.0.1:8080=2", "http://[::1]:80=" + "9" * 16,
    "=1", "http://a=", "x" * 400, "writing", "done",
)  # fmt: skip


def mutate_kv(base: bytes, rng: Random) -> bytes:
    """A report with values replaced by hostile ones, keys repeated, dropped or unknown."""
    lines = base.decode().split("\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        key = lines[i].partition("=")[0] or "state"
        op = rng.randrange(4)
        if op == 0:
            value = rng.choice(HOSTILE_VALUES) if rng.random() < 0.7 else rand_text(rng, 12)
            lines[i] = f"{key}={value}"
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            del lines[i]
            lines = lines or [""]
        else:
            lines.insert(i, f"{rand_text(rng, 8)}={rand_text(rng, 8)}")
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def _report_adversarial() -> list[bytes]:
    corrupt = ",".join(f"http://10.0.{i // 250}.{i % 250}:8080={10**15}" for i in range(63))
    return [
        f"state=writing\ncorrupt=http://10.77.0.3:8080={10**15}\n".encode(),
        f"state=writing\ncorrupt={corrupt}\n".encode(),
        ("state=writing\ncorrupt=" + "," * 10000 + "\n").encode(),
        f"state=writing\ndone={10**30}\nsize={'9' * 5000}\n".encode(),
        b"\n" * 16000,
    ]


# --- node certificates and machine records (peer/core/identity.py, machine_records.py) -----


def _throwaway_keys() -> tuple[Any, Any]:
    signing = importlib.import_module("imaging.signing")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = hashlib.sha256(b"pxepeer fuzz").digest()
    enroll = signing.SigningKey(Ed25519PrivateKey.from_private_bytes(seed))
    node = signing.SigningKey(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))
    return enroll, node


def _certificate_build() -> Parser:
    identity = importlib.import_module("peer.core.identity")
    enroll, _ = _throwaway_keys()
    keys = {enroll.key_id: enroll.public_key}

    def use(cert: Any, _data: bytes) -> None:
        cert.to_bytes()
        with contextlib.suppress(identity.IdentityError):
            cert.verify(keys)

    return Parser(identity.NodeCertificate.from_bytes, (identity.IdentityError,), use=use)


@cache
def certificate_samples() -> list[bytes]:
    identity = importlib.import_module("peer.core.identity")
    enroll, node = _throwaway_keys()
    return [
        identity.NodeCertificate.issue(node.public_key, label, NOW, enroll).to_bytes()
        for label in ("till-3", "", "back office PC")
    ]


def _certificate_adversarial() -> list[bytes]:
    sample = json.loads(certificate_samples()[0])
    huge = dict(sample, certificate=dict(sample["certificate"], issued=10**400))
    return [
        json.dumps(huge).encode(),
        b"[" * 5000,
        json.dumps({"certificate": {"label": "x" * 4000}, "signature": {}}).encode(),
    ]


def _records_build() -> Parser:
    records = importlib.import_module("peer.core.machine_records")
    identity = importlib.import_module("peer.core.identity")
    enroll, node = _throwaway_keys()
    verifier = records.RecordVerifier(
        node.public_key, identity.CertificateCache({enroll.key_id: enroll.public_key})
    )

    def use(parsed: Any, _data: bytes) -> None:
        book = records.RecordBook()
        book.merge(parsed[0], parsed[1], verifier)
        book.to_bytes()
        book.machines()

    return Parser(records.parse_book, (records.RecordError,), use=use)


@cache
def records_samples() -> list[bytes]:
    records = importlib.import_module("peer.core.machine_records")
    identity = importlib.import_module("peer.core.identity")
    enroll, node = _throwaway_keys()
    cert = identity.NodeCertificate.issue(node.public_key, "p", NOW, enroll).to_bytes()
    book = records.RecordBook()
    made = [
        records.Record("assignment", f"52:54:00:00:00:{i:02x}", 1, "pos", None, NOW, node.key_id)
        for i in range(3)
    ] + [records.imaged_record("52:54:00:00:00:01", 1, "pos 1", _hex64("disk"), NOW, node.key_id)]
    book.merge([records.SignedRecord.sign(r, node) for r in made], {node.key_id: cert},
               records.RecordVerifier(node.public_key, None))  # fmt: skip
    return [book.to_bytes(), records.RecordBook().to_bytes()]


def _records_adversarial() -> list[bytes]:
    doc = json.loads(records_samples()[0])
    entry = doc["records"][0]
    many = dict(doc, records=[entry] * 2000)
    deep = dict(doc, records=[dict(entry, record=dict(entry["record"], generation=10**300))])
    return [json.dumps(many).encode(), json.dumps(deep).encode(), b'{"records":' * 3000]


# --- heartbeats (peer/core/heartbeat.py) ------------------------------------------------


def _site_datagram_build(parse: str) -> Parser:
    """A parser of the site link's signed datagrams (peer/core/heartbeat.py), used as the
    site does next: the gate, with the sender as a member, checks it, and a have-notice
    is then read as one."""
    hb = importlib.import_module("peer.core.heartbeat")
    _, node = _throwaway_keys()
    node_id = importlib.import_module("peer.core.identity").node_id_of(node.public_key)

    def use(parsed: Any, data: bytes) -> None:
        gate = hb.HeartbeatGate("0" * 16, "lab", lambda _node, ours: ours)
        gate.admit(node_id, node.public_key)
        with contextlib.suppress(hb.HeartbeatRefused):
            gate.check(data, 1.0, parsed[0].sent_ms)
        if hasattr(parsed[0], "notice"):
            parsed[0].notice()

    return Parser(getattr(hb, parse), (hb.HeartbeatRefused,), use=use)


def _heartbeat_build() -> Parser:
    return _site_datagram_build("parse")


def _signed_site_datagrams(make: Callable[[Any, str], list[Any]]) -> list[bytes]:
    """`make(heartbeat module, node id)`'s datagrams, signed by a throwaway node key."""
    hb = importlib.import_module("peer.core.heartbeat")
    _, node = _throwaway_keys()
    node_id = importlib.import_module("peer.core.identity").node_id_of(node.public_key)
    return [item.sign(node) for item in make(hb, node_id)]


@cache
def heartbeat_samples() -> list[bytes]:
    return _signed_site_datagrams(lambda hb, node_id: [
        hb.Heartbeat(node_id, "lab", "a" * 16, 1, NOW * 1000, 8080, True, (), "0" * 16),
        hb.Heartbeat(node_id, "store-42", "b" * 16, 2**40, NOW * 1000, 1, False,
                     (node_id, "f" * 16), "1" * 16),
    ])  # fmt: skip


def mutate_heartbeat(base: bytes, rng: Random) -> bytes:
    """The JSON payload mutated behind the magic and signature, which stay as they were
    (heartbeats and have datagrams alike: 5-byte magic, 64-byte signature)."""
    head = len(b"PXHB1") + 64
    return base[:head] + mutate_json(base[head:], rng)


def _heartbeat_adversarial() -> list[bytes]:
    head = b"PXHB1" + b"\0" * 64
    return [
        head + b"[" * 1100,
        head + b'{"seq":' + b"9" * 1100 + b"}",
        head + json.dumps({"votes": ["0" * 16] * 60}).encode(),
        b"PXHB1" + b"x" * 5000,
    ]


def _have_datagram_build() -> Parser:
    return _site_datagram_build("parse_have")


@cache
def have_datagram_samples() -> list[bytes]:
    return _signed_site_datagrams(lambda hb, node_id: [
        hb.HaveBeat(node_id, "lab", "a" * 16, 1, NOW * 1000, False, ((_hex64("a"), 3, 13),)),
        hb.HaveBeat(node_id, "store-42", "b" * 16, 2**40, NOW * 1000, True,
                    ((_hex64("a"), 0, 13), (_hex64("b"), 1023, 1024), (_hex64("a"), 12, 13))),
        # "arriving": relayed as it comes (cut-through)
        hb.HaveBeat(node_id, "lab", "c" * 16, 7, NOW * 1000, False, ((_hex64("c"), 5, 9),),
                    True, "0123456789abcdef"),
    ])  # fmt: skip


def _have_datagram_adversarial() -> list[bytes]:
    head = b"PXHV1" + b"\0" * 64
    group = [_hex64("a"), 2**20, [2**20 - 1]]
    return [
        head + b"[" * 1100,
        head + json.dumps({"have": [group] * 12}).encode(),  # 12 claims of a 4 TiB image
        head + json.dumps({"have": [[_hex64("a"), 2**20, list(range(300))]]}).encode(),
        b"PXHV1" + b"x" * 5000,
    ]


# --- the registry ------------------------------------------------------------------------


TARGETS: tuple[Target, ...] = (
    Target("dhcp", "pxe.dhcp:parse_client", _dhcp_build, dhcp_samples, mutate_dhcp,
           _dhcp_adversarial, max_random=1500),
    Target("tftp", "pxe.tftp:parse_packet", _tftp_build, tftp_samples, mutate_tftp,
           _tftp_adversarial, valid=_tftp_valid, max_random=1500),
    Target("hello", "peer.core.wire:parse_hello", _hello_build, hello_samples, mutate_json,
           _hello_adversarial, valid=_hello_valid),
    Target("have", "peer.core.wire:parse_have", _have_build, have_samples, mutate_json,
           _have_adversarial, valid=_have_valid),
    Target("catalog", "imaging.catalog:SignedCatalog.from_bytes", _catalog_build,
           catalog_samples, mutate_json, _catalog_adversarial, valid=_catalog_valid),
    Target("manifest", "imaging.manifest:SignedManifest.from_bytes", _manifest_build,
           manifest_samples, mutate_json, _manifest_adversarial, valid=_manifest_valid),
    Target("plan", "imaging.plan:Plan.parse", _plan_build, plan_samples, mutate_lines,
           _plan_adversarial, valid=_plan_valid),
    Target("progress", "imaging.progress_report:parse_report", _report_build, report_samples,
           mutate_kv, _report_adversarial),
    Target("range", "peer.api.byte_range:parse_range", _range_build, range_samples,
           mutate_range, _range_adversarial, max_random=256),
    Target("certificate", "peer.core.identity:NodeCertificate.from_bytes", _certificate_build,
           certificate_samples, mutate_json, _certificate_adversarial),
    Target("records", "peer.core.machine_records:parse_book", _records_build, records_samples,
           mutate_json, _records_adversarial),
    Target("heartbeat", "peer.core.heartbeat:parse", _heartbeat_build, heartbeat_samples,
           mutate_heartbeat, _heartbeat_adversarial, max_random=1400),
    Target("have-datagram", "peer.core.heartbeat:parse_have", _have_datagram_build,
           have_datagram_samples, mutate_heartbeat, _have_datagram_adversarial,
           max_random=1400),
)  # fmt: skip

BY_NAME = {t.name: t for t in TARGETS}

# Well-formed inputs whose answer is known without an encoder: (input, expected).
KNOWN_ANSWERS: dict[str, Callable[[], SearchStrategy[tuple[bytes, Any]]]] = {
    "range": _range_valid_pairs,
}
