"""The TFTP core (pxe/tftp.py) fed the packets real clients send: EDK2, iPXE, curl, tftp-hpa."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pxe.tftp import (
    DEADLINE_MESSAGE,
    REFUSED_BUSY,
    REFUSED_PER_CLIENT,
    Ack,
    Admission,
    AdmissionLimits,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    Opcode,
    OptionAck,
    Outcome,
    ReadSession,
    Request,
    ServerLimits,
    SessionView,
    TransferOptions,
    Verdict,
    admit,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
    negotiate,
    parse_packet,
    to_netascii,
)

# RRQs as the clients put them on the wire (curl and tftp-hpa captured on this machine;
# EDK2 and iPXE as FIRMWARE-NOTES.md and their sources describe them).
EDK2_PROBE = b"\x00\x01snponly.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00"
EDK2_FETCH = b"\x00\x01snponly.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00"
IPXE_RRQ = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001432\x00tsize\x000\x00"
CURL_RRQ = b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x001468\x00timeout\x006\x00"
TFTP_HPA_RRQ = b"\x00\x01f\x00octet\x00"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def session_for(data: bytes, options: TransferOptions, retries: int = 5) -> ReadSession:
    return ReadSession(lambda offset, length: data[offset : offset + length], len(data),
                       options, retries)  # fmt: skip


def data_block(packet: bytes) -> tuple[int, bytes]:
    opcode, block = struct.unpack("!HH", packet[:4])
    assert opcode == Opcode.DATA
    return block, packet[4:]


# -- codec ------------------------------------------------------------------------------


def test_edk2_size_probe_parses_with_its_three_options_in_order() -> None:
    request = parse_packet(EDK2_PROBE)
    assert request == Request(
        Opcode.RRQ, "snponly.efi", "octet", {"tsize": "0", "blksize": "1468", "windowsize": "4"}
    )
    assert list(request.options) == ["tsize", "blksize", "windowsize"]


@pytest.mark.parametrize(
    ("raw", "filename", "options"),
    [
        (IPXE_RRQ, "undionly.kpxe", {"blksize": "1432", "tsize": "0"}),
        (CURL_RRQ, "f", {"tsize": "0", "blksize": "1468", "timeout": "6"}),
        (TFTP_HPA_RRQ, "f", {}),
    ],
)
def test_client_requests_parse(raw: bytes, filename: str, options: dict[str, str]) -> None:
    assert parse_packet(raw) == Request(Opcode.RRQ, filename, "octet", options)


def test_option_names_and_mode_are_case_insensitive_and_the_first_duplicate_wins() -> None:
    request = parse_packet(b"\x00\x01f\x00OCTET\x00BlkSize\x00512\x00blksize\x001468\x00")
    assert isinstance(request, Request)
    assert request.mode == "octet"
    assert request.options == {"blksize": "512"}


def test_an_unpaired_trailing_option_is_ignored() -> None:
    request = parse_packet(b"\x00\x01f\x00octet\x00blksize\x001468\x00tsize\x00")
    assert isinstance(request, Request) and request.options == {"blksize": "1468"}


def test_non_utf8_filename_keeps_the_clients_bytes() -> None:
    request = parse_packet(b"\x00\x01caf\xe9.efi\x00octet\x00")
    assert isinstance(request, Request)
    assert request.filename.encode("utf-8", "surrogateescape") == b"caf\xe9.efi"


def test_wrq_parses_as_a_request_with_its_opcode() -> None:
    request = parse_packet(b"\x00\x02up.bin\x00octet\x00")
    assert isinstance(request, Request) and request.opcode is Opcode.WRQ


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x01",  # RRQ with nothing
        b"\x00\x01snponly.efi",  # truncated: no NUL
        b"\x00\x01snponly.efi\x00",  # no mode
        b"\x00\x01snponly.efi\x00octet",  # mode not terminated
        b"\x00\x01\x00octet\x00",  # empty filename
        b"\x00\x03\x00",  # truncated DATA
        b"\x00\x04\x00",  # truncated ACK
        b"\x00\x05\x00",  # truncated ERROR
        b"\x00\x07abc",  # unknown opcode
        b"\x00\x00\x00\x01",
        b"\xff\xff" + b"\x00" * 30,
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_datagrams_raise_malformed_packet(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_packet(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (b"\x00", "truncated"),
        (b"\x00\x04\x00", "truncated"),
        (b"\x00\x03\x00", "truncated"),
        (b"\x00\x07abc", "bad opcode"),
        (b"\x00\x00\x00\x01", "bad opcode"),
        (b"\x00\x01snponly.efi", "bad request"),
        (b"\x00\x01\x00octet\x00", "bad request"),
    ],
)
def test_malformed_packets_carry_a_short_fixed_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as caught:
        parse_packet(raw)
    assert caught.value.reason == reason and str(caught.value)  # the message has the detail


def test_random_garbage_raises_nothing_but_malformed_packet() -> None:
    rng = random.Random(2348)
    for _ in range(20_000):
        prefix = rng.choice([b"", b"\x00\x01", b"\x00\x02", b"\x00\x05", b"\x00\x06"])
        raw = prefix + rng.randbytes(rng.randrange(0, 80))
        try:
            parse_packet(raw)
        except MalformedPacket:
            pass


def test_packets_round_trip_through_the_encoders() -> None:
    assert parse_packet(encode_data(65535, b"abc")) == Data(65535, b"abc")
    assert parse_packet(encode_ack(0)) == Ack(0)
    assert parse_packet(encode_error(ErrorCode.FILE_NOT_FOUND, "no such file")) == Error(
        1, "no such file"
    )
    assert parse_packet(encode_oack({"tsize": "99", "blksize": "1468"})) == OptionAck(
        {"tsize": "99", "blksize": "1468"}
    )
    assert parse_packet(encode_request("a/b.efi", "octet", {"blksize": 1468})) == Request(
        Opcode.RRQ, "a/b.efi", "octet", {"blksize": "1468"}
    )


def test_error_without_final_nul_still_parses() -> None:
    assert parse_packet(b"\x00\x05\x00\x08aborted") == Error(8, "aborted")


def test_data_block_numbers_are_written_modulo_65536() -> None:
    assert encode_data(65536, b"")[:4] == b"\x00\x03\x00\x00"
    assert encode_ack(65537) == b"\x00\x04\x00\x01"


# -- option negotiation -----------------------------------------------------------------


def test_edk2_probe_gets_real_size_blksize_and_windowsize_in_its_order() -> None:
    request = parse_packet(EDK2_PROBE)
    assert isinstance(request, Request)
    options = negotiate(request.options, 1_017_344)
    assert options.acknowledged == {"tsize": "1017344", "blksize": "1468", "windowsize": "4"}
    assert list(options.acknowledged) == ["tsize", "blksize", "windowsize"]
    assert (options.blksize, options.windowsize) == (1468, 4)


def test_ipxe_blksize_below_the_cap_is_granted_as_asked() -> None:
    options = negotiate({"blksize": "1432", "tsize": "0"}, 70_000)
    assert options.acknowledged == {"blksize": "1432", "tsize": "70000"}


def test_curl_timeout_option_is_acknowledged_clamped_to_5_and_used() -> None:
    options = negotiate({"tsize": "0", "blksize": "1468", "timeout": "6"}, 5)
    assert options.acknowledged["timeout"] == "5" and options.timeout == 5.0


@pytest.mark.parametrize(("asked", "granted"), [("1", "1"), ("3", "3"), ("5", "5"), ("6", "5"),
                                                ("255", "5")])  # fmt: skip
def test_timeout_is_clamped_to_5_seconds_and_the_oack_says_what_is_used(
    asked: str, granted: str
) -> None:
    options = negotiate({"timeout": asked}, 1)
    assert options.acknowledged == {"timeout": granted}
    assert options.timeout == float(granted)


def test_the_timeout_cap_also_bounds_the_servers_own_default() -> None:
    limits = ServerLimits(default_timeout=30.0, timeout_cap=2)
    assert negotiate({}, 1, limits).timeout == 2.0
    assert negotiate({"timeout": "9"}, 1, limits).acknowledged == {"timeout": "2"}


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        ("1468", "1468"),
        ("8", "8"),
        ("9000", "1468"),  # above the interface's cap: lowered
        ("65464", "1468"),
        ("65465", "1468"),  # above RFC 2348's maximum
        ("9" * 5000, "1468"),  # more digits than int() accepts
    ],
)
def test_blksize_is_lowered_to_the_cap_never_raised(asked: str, granted: str) -> None:
    assert negotiate({"blksize": asked}, 1).acknowledged == {"blksize": granted}


@pytest.mark.parametrize("asked", ["7", "0", "abc", "", "-512", "1_000", "+512", "²"])
def test_invalid_blksize_is_left_out_and_512_used(asked: str) -> None:
    options = negotiate({"blksize": asked}, 1)
    assert options.acknowledged == {} and options.blksize == 512


def test_blksize_cap_itself_is_clamped_to_rfc_2348_range() -> None:
    assert negotiate({"blksize": "70000"}, 1, ServerLimits(blksize_cap=100_000)).blksize == 65464
    assert negotiate({"blksize": "70000"}, 1, ServerLimits(blksize_cap=1)).blksize == 8


def test_windowsize_is_capped_and_zero_is_ignored() -> None:
    assert negotiate({"windowsize": "1000"}, 1).acknowledged == {"windowsize": "64"}
    assert negotiate({"windowsize": "0"}, 1).acknowledged == {}


@pytest.mark.parametrize(("asked", "acked"), [("1", True), ("255", True), ("0", False),
                                              ("256", False), ("x", False)])  # fmt: skip
def test_timeout_is_taken_only_within_1_to_255(asked: str, acked: bool) -> None:
    assert ("timeout" in negotiate({"timeout": asked}, 1).acknowledged) is acked


def test_unknown_options_are_ignored_and_no_options_means_no_oack() -> None:
    options = negotiate({"multicast": "", "rollover": "0", "utimeout": "1000"}, 10)
    assert options.acknowledged == {} and options.blksize == 512 and options.windowsize == 1


def test_tsize_in_a_request_is_answered_with_the_real_size_whatever_was_sent() -> None:
    assert negotiate({"tsize": "12345"}, 42).acknowledged == {"tsize": "42"}


# -- the sending state machine ----------------------------------------------------------


def run_lockstep(session: ReadSession, start: list[bytes]) -> bytes:
    """A well-behaved RFC 1350 client: ACK each DATA, stop after the short block."""
    received = bytearray()
    out = start
    expected = 1
    while out:
        [packet] = out
        block, chunk = data_block(packet)
        assert block == expected & 0xFFFF
        received += chunk
        out = session.receive(encode_ack(block), 0.0)
        expected += 1
        if len(chunk) < session.blksize:
            assert out == []
            break
    return bytes(received)


def test_without_options_data_1_goes_out_at_once_and_the_file_arrives() -> None:
    data = payload(512 * 3 + 100)
    session = session_for(data, negotiate({}, len(data)))
    first = session.start(0.0)
    assert data_block(first[0])[0] == 1
    assert run_lockstep(session, first) == data
    assert session.done and session.outcome is Outcome.COMPLETED
    assert session.bytes_acknowledged == len(data)


def test_a_size_that_is_a_multiple_of_blksize_ends_with_an_empty_block() -> None:
    data = payload(512 * 4)
    session = session_for(data, negotiate({}, len(data)))
    sent = []
    out = session.start(0.0)
    while out:
        block, chunk = data_block(out[0])
        sent.append(len(chunk))
        out = session.receive(encode_ack(block), 0.0)
    assert sent == [512, 512, 512, 512, 0]
    assert session.outcome is Outcome.COMPLETED


def test_empty_file_is_one_empty_block() -> None:
    session = session_for(b"", negotiate({}, 0))
    assert session.start(0.0) == [b"\x00\x03\x00\x01"]
    assert session.receive(encode_ack(1), 0.0) == [] and session.outcome is Outcome.COMPLETED


def test_curl_request_gets_oack_then_data_after_ack_0() -> None:
    request = parse_packet(CURL_RRQ)
    assert isinstance(request, Request)
    data = payload(5000)
    session = session_for(data, negotiate(request.options, len(data)))
    [oack] = session.start(0.0)
    assert parse_packet(oack) == OptionAck({"tsize": "5000", "blksize": "1468", "timeout": "5"})
    first = session.receive(encode_ack(0), 0.1)
    assert run_lockstep(session, first) == data


def test_edk2_probe_declined_with_error_8_ends_quietly_as_aborted() -> None:
    request = parse_packet(EDK2_PROBE)
    assert isinstance(request, Request)
    session = session_for(payload(100_000), negotiate(request.options, 100_000))
    [oack] = session.start(0.0)
    assert isinstance(parse_packet(oack), OptionAck)
    reply = session.receive(encode_error(ErrorCode.OPTION_REFUSED, "User aborted"), 0.01)
    assert reply == [] and session.done and session.outcome is Outcome.ABORTED
    assert session.tick(100.0) == []  # nothing more is ever sent


def test_edk2_probe_declined_with_error_0_is_also_aborted() -> None:
    session = session_for(b"x", negotiate({"tsize": "0"}, 1))
    session.start(0.0)
    session.receive(encode_error(0, ""), 0.0)
    assert session.outcome is Outcome.ABORTED


def test_a_client_gone_after_the_oack_aborted_but_gone_mid_transfer_failed() -> None:
    probe = session_for(b"x" * 5000, negotiate({"tsize": "0"}, 5000))
    probe.start(0.0)
    probe.client_gone("client port closed")
    assert probe.outcome is Outcome.ABORTED
    fetch = session_for(b"x" * 5000, negotiate({"tsize": "0"}, 5000))
    fetch.start(0.0)
    fetch.receive(encode_ack(0), 0.0)
    fetch.client_gone("client port closed")
    assert fetch.outcome is Outcome.FAILED and fetch.reason == "client port closed"


def test_edk2_fetch_with_windowsize_4_sends_four_blocks_per_ack() -> None:
    request = parse_packet(EDK2_FETCH)
    assert isinstance(request, Request)
    data = payload(1468 * 10 + 7)
    session = session_for(data, negotiate(request.options, len(data)))
    [oack] = session.start(0.0)
    assert parse_packet(oack) == OptionAck({"blksize": "1468", "windowsize": "4"})
    received = bytearray()
    out = session.receive(encode_ack(0), 0.0)
    windows = []
    while out:
        blocks = [data_block(p) for p in out]
        windows.append([b for b, _ in blocks])
        for _, chunk in blocks:
            received += chunk
        out = session.receive(encode_ack(blocks[-1][0]), 0.0)
    assert windows == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert bytes(received) == data and session.outcome is Outcome.COMPLETED


def test_ack_inside_a_window_rewinds_to_the_block_after_it() -> None:
    data = payload(1468 * 20)
    session = session_for(data, negotiate({"blksize": "1468", "windowsize": "4"}, len(data)))
    session.start(0.0)
    session.receive(encode_ack(0), 0.0)  # DATA 1-4
    session.receive(encode_ack(4), 0.0)  # DATA 5-8; the client then misses 7
    resent = session.receive(encode_ack(6), 0.0)
    assert [data_block(p)[0] for p in resent] == [7, 8, 9, 10]
    assert data_block(resent[0])[1] == data[6 * 1468 : 7 * 1468]


def test_duplicate_acks_are_never_answered_sorcerers_apprentice() -> None:
    data = payload(512 * 10)
    session = session_for(data, negotiate({}, len(data)))
    session.start(0.0)
    assert len(session.receive(encode_ack(1), 0.0)) == 1  # DATA 2
    assert session.receive(encode_ack(1), 0.0) == []  # the same ACK, delayed
    assert len(session.receive(encode_ack(2), 0.0)) == 1  # DATA 3
    assert session.receive(encode_ack(0), 0.0) == []  # stale
    assert session.receive(encode_ack(9), 0.0) == []  # never sent: not acknowledged


def test_duplicate_ack_inside_a_window_rewinds_once_only() -> None:
    data = payload(512 * 40)
    session = session_for(data, negotiate({"windowsize": "8"}, len(data)))
    session.start(0.0)
    session.receive(encode_ack(0), 0.0)  # 1-8
    assert len(session.receive(encode_ack(3), 0.0)) == 8  # gap after 3: 4-11
    # The receiver repeats ACK 3 for each out-of-order block it drops: all ignored.
    for _ in range(5):
        assert session.receive(encode_ack(3), 0.0) == []


def test_block_numbers_roll_over_from_65535_to_0() -> None:
    blocks = 65536 + 10
    data = bytes(range(256)) * 2 * blocks  # 512 bytes per block, > 32 MiB
    data += b"tail"
    session = session_for(data, negotiate({}, len(data)))
    received = bytearray()
    wire = []
    out = session.start(0.0)
    while out:
        block, chunk = data_block(out[0])
        if 65533 <= len(wire) + 1 <= 65539:
            wire.append(block)
        else:
            wire.append(None)
        received += chunk
        out = session.receive(encode_ack(block), 0.0)
    assert [b for b in wire if b is not None] == [65533, 65534, 65535, 0, 1, 2, 3]
    assert bytes(received) == data and session.outcome is Outcome.COMPLETED


def test_windows_straddle_the_rollover() -> None:
    data = payload(16 * 65540)
    session = session_for(data, negotiate({"blksize": "16", "windowsize": "7"}, len(data)))
    session.start(0.0)
    out = session.receive(encode_ack(0), 0.0)
    received = bytearray()
    while out:
        blocks = [data_block(p) for p in out]
        for _, chunk in blocks:
            received += chunk
        out = session.receive(encode_ack(blocks[-1][0]), 0.0)
    assert bytes(received) == data and session.outcome is Outcome.COMPLETED


def test_silence_retransmits_the_same_data_after_the_timeout_then_gives_up() -> None:
    data = payload(2000)
    session = session_for(data, negotiate({}, len(data)), retries=3)
    [first] = session.start(10.0)
    assert session.deadline == 11.0
    assert session.tick(10.5) == []  # not yet
    for attempt in range(3):
        now = 11.0 + attempt
        assert session.tick(now) == [first]
    assert session.tick(14.0) == []
    assert session.done and session.outcome is Outcome.FAILED
    assert "no answer to block 1" in session.reason and session.retransmits == 3


def test_progress_resets_the_retry_count() -> None:
    data = payload(512 * 5)
    session = session_for(data, negotiate({}, len(data)), retries=2)
    session.start(0.0)
    session.tick(1.0)
    session.tick(2.0)  # two retries used on block 1
    session.receive(encode_ack(1), 2.5)
    assert len(session.tick(3.5)) == 1 and not session.done


def test_negotiated_timeout_sets_the_retransmission_interval() -> None:
    session = session_for(b"abc", negotiate({"timeout": "3"}, 3))
    session.start(0.0)
    assert session.deadline == 3.0
    assert session.tick(2.9) == [] and len(session.tick(3.0)) == 1  # the OACK again


def test_window_timeout_resends_the_whole_window_from_the_first_unacked_block() -> None:
    data = payload(512 * 20)
    session = session_for(data, negotiate({"windowsize": "4"}, len(data)))
    session.start(0.0)
    session.receive(encode_ack(0), 0.0)
    session.receive(encode_ack(2), 0.1)  # 3-6 in flight, then silence
    assert [data_block(p)[0] for p in session.tick(1.1)] == [3, 4, 5, 6]


class WindowReceiver:
    """An RFC 7440 receiver: ACK after `windowsize` blocks in order, at the end, or at a gap."""

    def __init__(self, blksize: int, windowsize: int):
        self.blksize, self.windowsize = blksize, windowsize
        self.received = bytearray()
        self.next_block = 1
        self.since_ack = 0

    def handle(self, packet: bytes) -> list[bytes]:
        parsed = parse_packet(packet)
        if isinstance(parsed, OptionAck):
            return [encode_ack(0)]
        assert isinstance(parsed, Data)
        if parsed.block != self.next_block & 0xFFFF:
            self.since_ack = 0
            return [encode_ack(self.next_block - 1)]
        self.received += parsed.payload
        self.next_block += 1
        self.since_ack += 1
        if self.since_ack == self.windowsize or len(parsed.payload) < self.blksize:
            self.since_ack = 0
            return [encode_ack(self.next_block - 1)]
        return []


def test_lossy_channel_with_a_window_still_delivers_every_byte() -> None:
    """20% of the packets lost each way; the server's timer does the rest."""
    rng = random.Random(7440)

    def survivors(packets: list[bytes]) -> list[bytes]:
        return [p for p in packets if rng.random() >= 0.2]

    data = payload(1468 * 300 + 11)
    options = negotiate({"blksize": "1468", "windowsize": "4"}, len(data))
    session = session_for(data, options, retries=50)
    client = WindowReceiver(1468, 4)
    now = 0.0
    in_flight = survivors(session.start(now))
    while not session.done:
        replies = [ack for packet in in_flight for ack in client.handle(packet)]
        in_flight = []
        for ack in survivors(replies):
            in_flight += session.receive(ack, now)
        in_flight = survivors(in_flight)
        if not in_flight and not session.done:
            now = session.deadline
            in_flight = survivors(session.tick(now))
    assert session.outcome is Outcome.COMPLETED
    assert bytes(client.received) == data
    assert session.retransmits > 10


def test_garbage_and_unknown_opcodes_during_a_transfer_are_counted_and_ignored() -> None:
    data = payload(1000)
    session = session_for(data, negotiate({}, len(data)))
    session.start(0.0)
    for junk in (b"", b"\x00", b"\x00\x09zz", os.urandom(3), b"\x00\x03\x00"):
        assert session.receive(junk, 0.0) == []
    assert session.receive(b"\x00\x03\x00\x01abc", 0.0) == []  # DATA from a reader
    assert session.receive(encode_request("other.efi"), 0.0) == []
    assert session.malformed == 5 and not session.done
    assert sum(session.dropped.values()) == 5 and session.dropped["truncated"] >= 3
    assert len(session.receive(encode_ack(1), 0.0)) == 1


def test_ack_with_trailing_padding_is_accepted() -> None:
    session = session_for(payload(1000), negotiate({}, 1000))
    session.start(0.0)
    assert len(session.receive(encode_ack(1) + b"\x00" * 10, 0.0)) == 1


def test_client_error_mid_transfer_is_a_failure() -> None:
    session = session_for(payload(5000), negotiate({}, 5000))
    session.start(0.0)
    session.receive(encode_ack(1), 0.0)
    session.receive(encode_error(ErrorCode.DISK_FULL, "disk full"), 0.0)
    assert session.outcome is Outcome.FAILED and "disk full" in session.reason


def test_cancel_tells_the_client_and_fails_the_transfer() -> None:
    session = session_for(payload(5000), negotiate({}, 5000))
    session.start(0.0)
    [error] = session.cancel("server shutting down")
    assert parse_packet(error) == Error(0, "server shutting down")
    assert session.outcome is Outcome.FAILED and session.cancel("again") == []


def test_file_is_read_in_large_slices_not_per_block() -> None:
    data = payload(512 * 2000)
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset : offset + length]

    session = ReadSession(read_at, len(data), negotiate({}, len(data)))
    assert run_lockstep(session, session.start(0.0)) == data
    assert len(reads) <= 5 and all(length >= 256 * 1024 - 512 for _, length in reads)


def test_netascii_turns_lf_into_crlf_and_cr_into_cr_nul() -> None:
    assert to_netascii(b"a\nb\r\nc\rd") == b"a\r\nb\r\0\r\nc\r\0d"


# -- the total deadline of one transfer (fake clock) ---------------------------------------


def test_a_never_acking_client_asking_timeout_255_is_done_within_the_retries_at_5_s() -> None:
    # The issue-7 attack: before the clamp, 6 x 255 s per session.
    session = session_for(payload(5000), negotiate({"timeout": "255", "tsize": "0"}, 5000))
    session.start(0.0)
    now = 0.0
    while not session.done:
        now = session.deadline
        session.tick(now)
    assert now == 30.0 and session.outcome is Outcome.FAILED  # 6 x 5 s


def test_a_transfer_past_its_deadline_fails_with_an_error_even_if_acks_keep_coming() -> None:
    data = payload(512 * 200)
    session = ReadSession(lambda o, n: data[o : o + n], len(data), negotiate({}, len(data)),
                          max_seconds=120.0)  # fmt: skip
    session.start(1000.0)
    assert session.expires == 1120.0
    # A client that ACKs each block just before the 1 s retransmission timer: never silent,
    # never a retry, and 200 blocks would take 180 s.
    now, block = 1000.0, 0
    out: list[bytes] = []
    while not session.done:
        now += 0.9
        block += 1
        out = session.receive(encode_ack(block), now)
    assert 1120.0 <= now < 1121.0 and block < 200
    assert session.outcome is Outcome.FAILED and session.expired
    assert out == [encode_error(ErrorCode.NOT_DEFINED, DEADLINE_MESSAGE)]
    assert "deadline of 120 s" in session.reason


def test_the_retransmission_timer_never_runs_past_the_transfer_deadline() -> None:
    data = payload(2000)
    options = negotiate({"timeout": "5"}, len(data))
    session = ReadSession(lambda o, n: data[o : o + n], len(data), options,
                          retries=100, max_seconds=12.0)  # fmt: skip
    session.start(0.0)
    deadlines = []
    while not session.done:
        deadlines.append(session.deadline)
        out = session.tick(session.deadline)
    assert deadlines == [5.0, 10.0, 12.0]
    assert session.expired and out == [encode_error(ErrorCode.NOT_DEFINED, DEADLINE_MESSAGE)]


def test_a_transfer_inside_its_deadline_is_untouched_by_it() -> None:
    data = payload(3000)
    session = ReadSession(lambda o, n: data[o : o + n], len(data), negotiate({}, len(data)),
                          max_seconds=120.0)  # fmt: skip
    first = session.start(0.0)
    assert run_lockstep(session, first) == data
    assert session.outcome is Outcome.COMPLETED and not session.expired


# -- admission: per-client limit, reserve, eviction of the stalled (fake clock) --------------

LIMITS = AdmissionLimits(max_sessions=8, per_client=2, reserve=2, stall_after=1.0)


def views(*specs: tuple[str, float, int]) -> list[SessionView]:
    return [SessionView(key, client, at, acked) for key, (client, at, acked) in enumerate(specs)]


def test_admission_accepts_while_there_is_room() -> None:
    assert admit("10.0.0.9", [], 0.0, LIMITS) == Admission(Verdict.ACCEPT)
    assert admit("10.0.0.9", views(("10.0.0.9", 0.0, 0)), 0.0, LIMITS) == Admission(Verdict.ACCEPT)


def test_one_address_gets_at_most_its_per_client_share() -> None:
    mine = views(("10.0.0.9", 0.0, 0), ("10.0.0.9", 0.0, 0))
    assert admit("10.0.0.9", mine, 50.0, LIMITS) == Admission(Verdict.REFUSE, REFUSED_PER_CLIENT)
    assert admit("10.0.0.8", mine, 50.0, LIMITS).verdict is Verdict.ACCEPT


def test_the_reserve_is_for_addresses_not_yet_served() -> None:
    six = views(*[(f"10.0.0.{i}", 0.0, 0) for i in range(6)])  # 8 - reserve 2
    assert admit("10.0.0.0", six, 0.1, LIMITS) == Admission(Verdict.REFUSE, REFUSED_BUSY)
    assert admit("10.0.0.99", six, 0.1, LIMITS) == Admission(Verdict.ACCEPT)


def test_a_full_server_refuses_while_nobody_is_stalled() -> None:
    full = views(*[(f"10.0.0.{i}", 10.0, 0) for i in range(8)])
    assert admit("10.0.0.99", full, 10.5, LIMITS) == Admission(Verdict.REFUSE, REFUSED_BUSY)


def test_a_new_client_evicts_the_transfer_stalled_longest() -> None:
    full = views(
        ("10.0.0.1", 9.8, 100),   # progressing
        ("10.0.0.2", 3.0, 5000),  # stalled since 3.0
        ("10.0.0.3", 1.0, 0),     # stalled since 1.0: the longest
        ("10.0.0.4", 1.0, 900),   # as long, but it got further
        *[(f"10.0.1.{i}", 9.9, 10) for i in range(4)],
    )  # fmt: skip
    assert admit("10.0.0.99", full, 10.0, LIMITS) == Admission(Verdict.ACCEPT, evict=2)


def test_a_transfer_is_not_stalled_before_stall_after() -> None:
    full = views(*[(f"10.0.0.{i}", 10.0, 0) for i in range(8)])
    assert admit("10.0.0.99", full, 10.999, LIMITS).verdict is Verdict.REFUSE
    assert admit("10.0.0.99", full, 11.0, LIMITS).evict == 0


def test_an_address_already_served_never_evicts_others() -> None:
    full = views(("10.0.0.99", 0.0, 0), *[(f"10.0.0.{i}", 0.0, 0) for i in range(7)])
    assert admit("10.0.0.99", full, 100.0, LIMITS) == Admission(Verdict.REFUSE, REFUSED_BUSY)


def test_64_silent_sessions_from_64_addresses_leave_room_for_the_65th() -> None:
    limits = AdmissionLimits()  # the server's defaults: 64 sessions, 4 each, 8 in reserve
    sessions: list[SessionView] = []
    for i in range(64):
        decision = admit(f"10.1.0.{i}", sessions, 0.0, limits)
        assert decision.verdict is Verdict.ACCEPT and decision.evict is None
        sessions.append(SessionView(i, f"10.1.0.{i}", 0.0, 0))
    assert admit("10.9.9.9", sessions, 0.5, limits).verdict is Verdict.REFUSE
    assert admit("10.9.9.9", sessions, 1.5, limits) == Admission(Verdict.ACCEPT, evict=0)


# -- the lock-step fast path ---------------------------------------------------------------


def _drive(
    session: ReadSession, use_lockstep: bool, acks: list[tuple[bytes, float]]
) -> tuple[list, int]:
    """Feed `acks` (datagram, time); what goes out and the session's state after each, and
    how many the fast path answered."""
    trace, fast = [], 0
    for data, now in acks:
        packet = session.lockstep(data, now) if use_lockstep else None
        fast += packet is not None
        out = [packet] if packet is not None else session.receive(data, now)
        trace.append((out, session.deadline, session.bytes_acknowledged, session.done))
    return trace, fast


def test_lockstep_sends_what_receive_sends_through_rollover_and_to_the_end() -> None:
    # 70,000 blocks of 8 bytes: past the 65535 -> 0 rollover and across read-ahead chunks,
    # with a duplicate ACK and junk in between, which the fast path leaves to `receive`.
    data = payload(8 * 70_000 + 3)
    options = negotiate({"blksize": "8"}, len(data))
    sessions = [session_for(data, options), session_for(data, options)]
    starts = [s.start(0.0) for s in sessions]
    assert starts[0] == starts[1]
    acks = [(encode_ack(0), 0.0)]  # the OACK's ACK
    for block in range(1, 70_002):
        acks.append((encode_ack(block & 0xFFFF), block * 1e-4))
        if block % 9_999 == 0:
            acks += [(encode_ack(block & 0xFFFF), block * 1e-4), (b"\x00\x09junk", block * 1e-4)]
    (slow, _), (fast, hits) = _drive(sessions[0], False, acks), _drive(sessions[1], True, acks)
    assert fast == slow
    assert hits == 70_000  # every ACK but the OACK's, the last block's and the repeats
    assert sessions[1].outcome is Outcome.COMPLETED and sessions[1].retransmits == 0
    assert sessions[1].dropped == sessions[0].dropped != {}


def test_lockstep_declines_what_is_not_the_next_ack_and_changes_nothing() -> None:
    data = payload(512 * 4)
    session = session_for(data, negotiate({"tsize": "0"}, len(data)))
    session.start(0.0)
    assert session.lockstep(encode_ack(0), 0.1) is None  # the OACK's ACK: the slow path
    assert data_block(session.receive(encode_ack(0), 0.1)[0])[0] == 1
    before = (session.deadline, session.bytes_acknowledged)
    for datagram in (encode_ack(0), encode_ack(2), encode_ack(1) + b"x", b"", encode_data(1, b"")):
        assert session.lockstep(datagram, 0.2) is None
    assert (session.deadline, session.bytes_acknowledged) == before
    assert data_block(session.lockstep(encode_ack(1), 0.2))[0] == 2
    # Windows of more than one block always take the slow path.
    windowed = session_for(data, negotiate({"windowsize": "2"}, len(data)))
    windowed.start(0.0)
    windowed.receive(encode_ack(0), 0.0)
    assert windowed.lockstep(encode_ack(2), 0.0) is None


def test_lockstep_leaves_the_last_ack_and_the_transfer_deadline_to_receive() -> None:
    data = payload(512 * 3 + 1)
    session = ReadSession(lambda o, n: data[o : o + n], len(data), negotiate({}, len(data)),
                          max_seconds=10.0)  # fmt: skip
    session.start(0.0)
    assert session.lockstep(encode_ack(1), 1.0) is not None
    # One timeout (1 s) before the deadline the fast path stops, so the deadline it would
    # set never lies past the transfer's end; `receive` then expires the transfer.
    assert session.lockstep(encode_ack(2), 9.0) is None
    assert session.receive(encode_ack(2), 9.0) != []
    assert session.lockstep(encode_ack(3), 9.5) is None
    session.receive(encode_ack(3), 9.5)
    assert session.lockstep(encode_ack(4), 9.6) is None  # the last block's ACK
    assert session.receive(encode_ack(4), 9.6) == [] and session.outcome is Outcome.COMPLETED


def test_an_outside_fast_path_moves_the_session_as_lockstep_would() -> None:
    # What pxe/_lockstep.c does: take the window, answer ACKs itself, report the last block
    # sent and when. The session must end up where as many `lockstep` calls leave it.
    data = payload(8 * 70_000 + 3)
    options = negotiate({"blksize": "8"}, len(data))
    stepped, advanced = session_for(data, options), session_for(data, options)
    for session in (stepped, advanced):
        session.start(0.0)
        session.receive(encode_ack(0), 0.0)
    assert advanced.lockstep_window() == (1, 70_001, float("inf"))
    for block in range(1, 66_000):  # past the rollover
        assert stepped.lockstep(encode_ack(block & 0xFFFF), 2.5) is not None
    advanced.lockstep_advanced(66_000, 2.5)
    assert advanced.lockstep_window() == stepped.lockstep_window() == (66_000, 70_001, float("inf"))
    assert (advanced.deadline, advanced.bytes_acknowledged) == (
        stepped.deadline, stepped.bytes_acknowledged)  # fmt: skip
    # From here both go on identically, by either path, through the end.
    for block in range(66_000, 70_002):
        ack = encode_ack(block & 0xFFFF)
        assert (advanced.lockstep(ack, 3.0) or advanced.receive(ack, 3.0)) == (
            stepped.lockstep(ack, 3.0) or stepped.receive(ack, 3.0))  # fmt: skip
    assert advanced.outcome is stepped.outcome is Outcome.COMPLETED


def test_no_fast_path_window_while_lockstep_would_decline_everything() -> None:
    data = payload(512 * 4)
    session = session_for(data, negotiate({"tsize": "0"}, len(data)))
    session.start(0.0)
    assert session.lockstep_window() is None  # the OACK is outstanding
    session.receive(encode_ack(0), 0.0)
    assert session.lockstep_window() == (1, 5, float("inf"))
    with pytest.raises(ValueError, match="outside the lock-step window"):
        session.lockstep_advanced(6, 0.1)  # past the last block
    with pytest.raises(ValueError, match="outside the lock-step window"):
        session.lockstep_advanced(1, 0.1)  # not ahead of what was sent
    windowed = session_for(data, negotiate({"windowsize": "2"}, len(data)))
    windowed.start(0.0)
    windowed.receive(encode_ack(0), 0.0)
    assert windowed.lockstep_window() is None
    timed = ReadSession(lambda o, n: data[o : o + n], len(data), negotiate({}, len(data)),
                        max_seconds=10.0)  # fmt: skip
    timed.start(0.0)
    assert timed.lockstep_window() == (1, 5, 9.0)  # one timeout before the transfer's end
    session.cancel("stop")
    assert session.lockstep_window() is None
