"""Hellos and have-notices from the LAN: parsed as hostile, bounded before allocation."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from peer.core.wire import (
    MAX_HELLO_BYTES,
    ChunkBitmap,
    Hello,
    WireError,
    encode_have,
    parse_have,
    parse_hello,
)

NODE = "0123456789abcdef"
MID = "ab" * 32


def a_hello(**changes: object) -> dict[str, object]:
    bitmap = ChunkBitmap(10)
    for i in (0, 3, 9):
        bitmap.set(i)
    doc = Hello(NODE, "10.88.0.0/24", "10.88.0.10", 8080, 1.7e9, True, 3, True,
                {MID: bitmap}, [MID], {"wan_bytes": 5}, [MID], None).to_json()  # fmt: skip
    doc.update(changes)
    return doc


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_hello_round_trips_with_its_bitmaps() -> None:
    hello = parse_hello(raw(a_hello()))
    assert [i for i in range(10) if i in hello.holdings[MID]] == [0, 3, 9]
    assert hello.holdings[MID].count() == 3
    assert hello.endpoint == "10.88.0.10:8080"


def test_a_hello_says_whether_its_peer_reads_have_datagrams_and_an_older_one_does_not() -> None:
    assert parse_hello(raw(a_hello(have_datagrams=True))).have_datagrams
    older = a_hello()
    del older["have_datagrams"]
    assert not parse_hello(raw(older)).have_datagrams
    with pytest.raises(WireError):
        parse_hello(raw(a_hello(have_datagrams=1)))


def test_a_hello_says_whether_its_peer_reads_arriving_notices() -> None:
    assert parse_hello(raw(a_hello(relays=True))).relays
    older = a_hello(have_datagrams=True)
    older.pop("relays", None)
    assert not parse_hello(raw(older)).relays  # from before cut-through
    with pytest.raises(WireError):
        parse_hello(raw(a_hello(relays="yes")))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"started": 1e999}', "non-finite number"),
        (b'{"started": NaN}', "non-finite number"),
        (b'{"site": "\\ud800"}', "invalid unicode"),
        (b"\xff\xfe", "invalid utf-8"),
        (b"[]", "not an object"),
        (b'{"a":' * 100 + b"1" + b"}" * 100, "nested too deep"),
    ],
)
def test_hostile_hello_bodies_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        parse_hello(body)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "me"},
        {"node_id": 7},
        {"http_port": 0},
        {"http_port": 70000},
        {"http_port": True},
        {"started": -1},
        {"started": "0"},
        {"address": "not-an-ip"},
        {"address": "224.0.0.251"},
        {"site": "x" * 65},
        {"site": "a b"},
        {"can_answer_pxe": 1},
        {"catalog_serial": -1},
        {"catalog_serial": 1 << 70},
        {"holdings": {MID: "34359738368:AA=="}},
        {"holdings": {MID: "16:AA=="}},
        {"holdings": {"x": "8:AA=="}},
        {"holdings": {MID: 5}},
        {"wants": ["x"]},
        {"wants": [MID] * 300},
        {"fetching": "abc"},
        {"counters": {"a": -1}},
        {"counters": {"a": 1.5}},
        {"counters": {str(i): 1 for i in range(40)}},
        {"offers_seen": "yes"},
    ],
)
def test_hello_fields_are_checked_for_type_and_range(change: dict[str, object]) -> None:
    with pytest.raises(WireError):
        parse_hello(raw(a_hello(**change)))


def test_oversized_hello_is_refused_before_parsing() -> None:
    with pytest.raises(WireError) as caught:
        parse_hello(b" " * (MAX_HELLO_BYTES + 1))
    assert caught.value.reason == "too large"


def test_have_notice_claiming_2_to_the_34_chunks_allocates_nothing_large() -> None:
    body = raw({"node_id": NODE, "chunks": [{"manifest_id": MID, "index": 1, "size": 1 << 34}]})
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            parse_have(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_have_notice_round_trips_and_carries_gone() -> None:
    notice = parse_have(raw(encode_have(NODE, ((MID, 3, 10),), gone=True)))
    assert notice.chunks == ((MID, 3, 10),)
    assert notice.gone


@pytest.mark.parametrize(
    "chunks",
    [
        [{"manifest_id": MID, "index": 10, "size": 10}],
        [{"manifest_id": MID, "index": -1, "size": 10}],
        [{"manifest_id": MID, "index": 1.0, "size": 10}],
        [{"manifest_id": "zz", "index": 1, "size": 10}],
        [{"manifest_id": MID, "index": 1, "size": 10}] * 200,
        "nope",
    ],
)
def test_bad_have_notices_are_refused(chunks: object) -> None:
    with pytest.raises(WireError):
        parse_have(raw({"node_id": NODE, "chunks": chunks}))


def test_bitmap_count_follows_set_and_clear() -> None:
    bitmap = ChunkBitmap(12)
    for i in (0, 5, 5, 11, 12, -1):
        bitmap.set(i)
    assert bitmap.count() == 3
    bitmap.clear(5)
    bitmap.clear(5)
    assert bitmap.count() == 2
    again = ChunkBitmap.decode(bitmap.encode())
    assert again.count() == 2 and not again.complete()
