"""Heartbeats (peer/core/heartbeat.py): only a member's own, fresh, newer heartbeat counts;
forgeries, replays and floods are refused by reason and cost a bounded number of checks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaging.signing import SigningKey
from peer.core import heartbeat
from peer.core.heartbeat import HaveBeat, Heartbeat, HeartbeatGate, HeartbeatRefused, parse
from peer.core.identity import node_id_of
from peer.core.swarm_plan import ORIGIN
from peer.core.wire import HaveNotice

OURS = "0000000000000001"
SITE = "store-42"
NOW_MS = 1_800_000_000_000


def make_key() -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return SigningKey(Ed25519PrivateKey.generate())


SENDER = make_key()
SENDER_ID = node_id_of(SENDER.public_key)


def beat(seq: int = 1, *, sent_ms: int = NOW_MS, boot: str = "aaaaaaaaaaaaaaaa",
         site: str = SITE, node: str = SENDER_ID) -> Heartbeat:  # fmt: skip
    return Heartbeat(node, site, boot, seq, sent_ms, 8080, True, (SENDER_ID,), "0123456789abcdef")


def gate(offset_ms: int = 0) -> HeartbeatGate:
    g = HeartbeatGate(OURS, SITE, lambda node, ours: ours + offset_ms)
    g.admit(SENDER_ID, SENDER.public_key)
    return g


def refused(g: HeartbeatGate, datagram: bytes, now: float = 100.0, our_ms: int = NOW_MS) -> str:
    with pytest.raises(HeartbeatRefused) as exc:
        g.check(datagram, now, our_ms)
    return exc.value.reason


def test_a_members_heartbeat_is_accepted_with_what_it_says() -> None:
    got = gate().check(beat(7).sign(SENDER), 100.0, NOW_MS)
    assert got == beat(7)
    assert len(beat(7).sign(SENDER)) < 400  # a small datagram, whatever the site's size


def test_the_same_or_an_older_sequence_is_a_replay_and_a_newer_one_counts() -> None:
    g = gate()
    g.check(beat(5).sign(SENDER), 100.0, NOW_MS)
    assert refused(g, beat(5).sign(SENDER)) == "replay"
    assert refused(g, beat(4).sign(SENDER)) == "replay"
    assert g.check(beat(6).sign(SENDER), 101.0, NOW_MS + 1000).seq == 6


def test_a_restarted_sender_starts_a_new_sequence_under_a_new_boot() -> None:
    g = gate()
    g.check(beat(500).sign(SENDER), 100.0, NOW_MS)
    assert g.check(beat(1, boot="bbbbbbbbbbbbbbbb").sign(SENDER), 101.0, NOW_MS).seq == 1


def test_a_heartbeat_captured_long_ago_is_stale_even_to_a_receiver_that_just_restarted() -> None:
    g = gate()  # a fresh gate: no sequence remembered for the sender
    old = beat(9, sent_ms=NOW_MS - 60_000).sign(SENDER)
    assert refused(g, old) == "stale"
    # Freshness is judged in the sender's clock as its signed hellos taught us.
    ahead = gate(offset_ms=3_600_000)
    assert ahead.check(beat(1, sent_ms=NOW_MS + 3_600_000).sign(SENDER), 1.0, NOW_MS).seq == 1
    assert refused(ahead, beat(2).sign(SENDER)) == "stale"


def test_a_heartbeat_signed_by_anyone_but_the_member_is_refused() -> None:
    forger = make_key()
    assert refused(gate(), beat(1).sign(forger)) == "bad signature"
    # A changed field breaks the member's own signature (the gate never trusts fields).
    signed = beat(1).sign(SENDER)
    changed = signed.replace(b'"pxe":true', b'"pxe":false')
    assert changed != signed
    assert refused(gate(), changed) == "bad signature"
    flipped = bytearray(signed)
    flipped[len(heartbeat.MAGIC)] ^= 0x01  # the signature itself
    assert refused(gate(), bytes(flipped)) == "bad signature"


def test_non_members_other_sites_and_our_own_echo_never_count() -> None:
    stranger = make_key()
    stranger_id = node_id_of(stranger.public_key)
    assert refused(gate(), beat(1, node=stranger_id).sign(stranger)) == "unknown node"
    assert refused(gate(), beat(1, site="store-43").sign(SENDER)) == "other site"
    assert refused(gate(), beat(1, node=OURS).sign(SENDER)) == "own"
    g = gate()
    g.forget(SENDER_ID)
    assert refused(g, beat(1).sign(SENDER)) == "unknown node"


def test_a_flood_of_forgeries_costs_a_bounded_number_of_checks_per_second() -> None:
    g = gate()
    forger = make_key()
    reasons = [refused(g, beat(10 + i).sign(forger), now=100.2) for i in range(50)]
    checked = reasons.count("bad signature")
    assert checked == heartbeat.PER_MEMBER_CHECKS
    assert reasons.count("over budget") == 50 - checked
    # The member's real heartbeat in that second was crowded out; in the next it counts,
    # and the site core polls a member whose heartbeats stop counting (see the module).
    assert refused(g, beat(1).sign(SENDER), now=100.9) == "over budget"
    assert g.check(beat(2).sign(SENDER), 101.1, NOW_MS).seq == 2


def test_all_members_together_have_a_global_check_budget() -> None:
    g = HeartbeatGate(OURS, SITE, lambda node, ours: ours)
    keys = [make_key() for _ in range(3)]
    for k in keys:
        g.admit(node_id_of(k.public_key), k.public_key)
    limit = heartbeat.GLOBAL_CHECKS_BASE + heartbeat.PER_MEMBER_CHECKS * 3
    forger = make_key()
    spent = 0
    for k in keys * 100:
        reason = refused(g, beat(spent + 1, node=node_id_of(k.public_key)).sign(forger))
        spent += reason == "bad signature"
    assert spent <= limit


def test_a_flood_of_junk_is_not_even_parsed_past_a_budget_per_second() -> None:
    g = gate()
    limit = heartbeat.PARSE_BASE + heartbeat.PARSE_PER_MEMBER
    reasons = [refused(g, b"PXHB1" + b"x" * 900, now=50.5) for _ in range(limit + 100)]
    assert reasons.count("malformed") == limit
    assert reasons[limit:] == ["over budget"] * 100
    assert g.check(beat(1).sign(SENDER), 51.0, NOW_MS).seq == 1  # a new second


def test_parse_refuses_every_field_out_of_shape() -> None:
    good = json.loads(beat(1).payload())
    bad_values = {
        "seq": [True, -1, 1.5, 2**60, "1", None],
        "t": [-5, 2**60, 1e3],
        "port": [0, 65536, False],
        "pxe": [1, "yes", None],
        "votes": [["x"], [SENDER_ID] * 9, "abc", None],
        "node": ["ABCDEF0123456789", "0" * 15, 5],
        "boot": ["z" * 16, ""],
        "version": ["0" * 17],
        "site": ["", "a b", "x" * 65],
        "every": [0, -1, 6, 10**30, True, "2", 1.0, None],
    }
    for name, values in bad_values.items():
        for value in values:
            payload = json.dumps({**good, name: value}).encode()
            datagram = heartbeat.MAGIC + b"\0" * 64 + payload
            with pytest.raises(HeartbeatRefused) as exc:
                parse(datagram)
            assert exc.value.reason == "malformed", (name, value)
    extra = json.dumps({**good, "x": 1}).encode()
    with pytest.raises(HeartbeatRefused):
        parse(heartbeat.MAGIC + b"\0" * 64 + extra)
    with pytest.raises(HeartbeatRefused) as exc:
        parse(heartbeat.MAGIC + b"\0" * 64 + b"{" * 2000)
    assert exc.value.reason == "oversize"
    for junk in (b"", b"PXHB1", b"PXHB1" + b"\0" * 64, b"GET / HTTP/1.1\r\n\r\n"):
        with pytest.raises(HeartbeatRefused):
            parse(junk)
    for token in (b"1e999", b"NaN", b'"\\ud800"'):
        payload = beat(1).payload().replace(b'"t":' + str(NOW_MS).encode(), b'"t":' + token)
        with pytest.raises(HeartbeatRefused):
            parse(heartbeat.MAGIC + b"\0" * 64 + payload)


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=1400))
def test_no_datagram_raises_anything_but_a_refusal_or_counts_without_the_key(data: bytes) -> None:
    g = gate()
    for datagram in (data, heartbeat.MAGIC + data, beat(1).sign(SENDER)[:69] + data):
        try:
            got = g.check(datagram, 100.0, NOW_MS)
        except HeartbeatRefused:
            continue
        pytest.fail(f"counted without the member's signature: {got}")


def test_a_large_site_beats_less_often_but_its_responders_every_second() -> None:
    every = heartbeat.beat_every
    assert [every(n, responder=False) for n in (1, 20, 21, 40, 100, 101, 5000)] == [
        1, 1, 2, 2, 5, 5, 5,
    ]
    assert every(100, responder=True) == 1
    # A member is given three of its periods (and a second) before it leaves the view,
    # never less than the site's usual timeout.
    assert heartbeat.member_timeout(1, 6.0) == 6.0
    assert heartbeat.member_timeout(5, 6.0) == 16.0


def test_the_period_travels_signed_and_an_older_peers_heartbeat_means_every_second() -> None:
    slow = Heartbeat(SENDER_ID, SITE, "a" * 16, 1, NOW_MS, 8080, False, (), "0" * 16, every=5)
    assert gate().check(slow.sign(SENDER), 100.0, NOW_MS).every == 5
    doc = json.loads(beat(2).payload())
    del doc["every"]  # what a peer from before the period sends
    payload = json.dumps(doc, separators=(",", ":")).encode()
    datagram = heartbeat.MAGIC + SENDER.sign(heartbeat.DOMAIN + payload) + payload
    assert gate().check(datagram, 100.0, NOW_MS).every == 1


# -- have-notices as datagrams --------------------------------------------------------

M1, M2 = "1" * 64, "2" * 64


def have(seq: int, *chunks: tuple[str, int, int], gone: bool = False,
         boot: str = "aaaaaaaaaaaaaaaa", node: str = SENDER_ID) -> HaveBeat:  # fmt: skip
    return HaveBeat(node, SITE, boot, seq, NOW_MS, gone, chunks)


def test_a_members_have_datagram_is_its_notice_in_its_heartbeat_sequence() -> None:
    g = gate()
    g.check(beat(1).sign(SENDER), 100.0, NOW_MS)
    notice = have(2, (M1, 3, 16), (M2, 0, 4), (M1, 7, 16))
    got = g.check(notice.sign(SENDER), 100.1, NOW_MS)
    assert isinstance(got, HaveBeat)
    assert got.notice() == HaveNotice(SENDER_ID, ((M1, 3, 16), (M1, 7, 16), (M2, 0, 4)))
    assert g.last_missed == 0
    # One counter for both kinds: an older number of either is a replay.
    assert refused(g, have(1, (M1, 3, 16)).sign(SENDER)) == "replay"
    assert refused(g, beat(2).sign(SENDER)) == "replay"
    assert g.check(have(3, (M1, 4, 16), gone=True).sign(SENDER), 100.2, NOW_MS).gone


def test_an_arriving_notice_is_its_own_kind_and_signed_as_such() -> None:
    """Cut-through: "receiving these now" rides the same datagram, marked; the mark is
    signed (an "arriving" turned into a have, or back, fails the signature) and never
    comes with gone."""
    g = gate()
    feeder = "f" * 16
    arriving = HaveBeat(SENDER_ID, SITE, "aaaaaaaaaaaaaaaa", 1, NOW_MS, False, ((M1, 3, 16),),
                        True, feeder)  # fmt: skip
    got = g.check(arriving.sign(SENDER), 100.0, NOW_MS)
    assert isinstance(got, HaveBeat) and got.arriving and got.notice().source == feeder
    signed = replace(arriving, seq=2).sign(SENDER)
    plain = signed.replace(b',"arriving":true,"from":"' + feeder.encode() + b'"', b"")
    assert plain != signed and refused(g, plain) == "bad signature"
    assert refused(g, signed.replace(feeder.encode(), b"e" * 16)) == "bad signature"
    assert not g.check(have(3, (M1, 3, 16)).sign(SENDER), 100.1, NOW_MS).arriving
    # A chunk coming from the origin: "from" names it, not a member.
    wan = replace(arriving, seq=4, source=ORIGIN)
    assert g.check(wan.sign(SENDER), 100.2, NOW_MS).notice().source == ORIGIN
    good = json.loads(arriving.payload())
    without_source = {k: v for k, v in good.items() if k != "from"}
    for bad in ({**good, "arriving": False}, {**good, "arriving": 1}, {**good, "gone": True},
                without_source, {**good, "from": "F" * 16}, {**good, "from": SENDER_ID},
                {**good, "from": "Origin"}, {**good, "from": "nginx"},
                {**good, "from": 7}):  # fmt: skip
        with pytest.raises(HeartbeatRefused) as exc:
            heartbeat.parse_have(heartbeat.HAVE_MAGIC + b"\0" * 64 + json.dumps(bad).encode())
        assert exc.value.reason == "malformed", bad


def test_a_have_datagram_signs_only_as_one_and_never_with_a_heartbeats_signature() -> None:
    assert refused(gate(), have(1, (M1, 0, 16)).sign(make_key())) == "bad signature"
    notice = have(1, (M1, 0, 16)).sign(SENDER)
    assert refused(gate(), notice.replace(b'"gone":false', b'"gone":true')) == "bad signature"
    # The same payload signed as a heartbeat (another domain) does not pass as a notice.
    payload = have(1, (M1, 0, 16)).payload()
    crossed = heartbeat.HAVE_MAGIC + SENDER.sign(heartbeat.DOMAIN + payload) + payload
    assert refused(gate(), crossed) == "bad signature"
    # A stranger's notice is refused without offering an endpoint (only beats name one).
    stranger = make_key()
    with pytest.raises(HeartbeatRefused) as exc:
        gate().check(have(1, (M1, 0, 16), node=node_id_of(stranger.public_key)).sign(stranger),
                     100.0, NOW_MS)  # fmt: skip
    assert exc.value.reason == "unknown node" and exc.value.heartbeat is None


def test_a_gap_in_a_members_sequence_is_counted_as_missed_datagrams() -> None:
    g = gate()
    g.check(beat(1).sign(SENDER), 100.0, NOW_MS)
    g.check(beat(4).sign(SENDER), 101.0, NOW_MS)
    assert g.last_missed == 2
    g.check(have(5, (M1, 0, 16)).sign(SENDER), 101.1, NOW_MS)
    assert g.last_missed == 0
    g.check(beat(1, boot="bbbbbbbbbbbbbbbb").sign(SENDER), 102.0, NOW_MS)  # restarted
    assert g.last_missed == 0
    fresh = gate()  # nothing heard before: nothing known to be missed
    fresh.check(beat(9).sign(SENDER), 100.0, NOW_MS)
    assert fresh.last_missed == 0


def test_many_chunks_are_packed_into_datagrams_that_each_fit() -> None:
    chunks = tuple((M1 if i % 3 else M2, i, 400_000) for i in range(300_000, 300_600))
    runs = heartbeat.pack_chunks("x" * 64, chunks)
    assert len(runs) > 1 and tuple(c for run in runs for c in run) == chunks
    for run in runs:
        longest = HaveBeat("f" * 16, "x" * 64, "f" * 16, heartbeat.MAX_SEQ, heartbeat.MAX_T,
                           True, run)  # fmt: skip
        assert len(longest.sign(SENDER)) <= heartbeat.MAX_DATAGRAM
    assert heartbeat.pack_chunks(SITE, ((M1, 0, 1),)) == [((M1, 0, 1),)]


def test_parse_have_refuses_every_field_out_of_shape() -> None:
    good = json.loads(have(1, (M1, 3, 16)).payload())
    bad_values = {
        "gone": [0, "no", None],
        "have": [[], None, {}, [[M1, 16]], [[M1, 16, []]], [[M1, 16, [16]]], [[M1, 16, [-1]]],
                 [[M1, 0, [0]]], [[M1, 2**21, [0]]], [[M1, 16, [True]]], [[M1, True, [0]]],
                 [["A" * 64, 16, [0]]], [["1" * 63, 16, [0]]], [[M1, 16, [1.0]]],
                 [[M1, 16, 3]]],
        "seq": [-1, 2**60],
        "node": ["0" * 15],
    }  # fmt: skip
    for name, values in bad_values.items():
        for value in values:
            payload = json.dumps({**good, name: value}).encode()
            with pytest.raises(HeartbeatRefused) as exc:
                heartbeat.parse_have(heartbeat.HAVE_MAGIC + b"\0" * 64 + payload)
            assert exc.value.reason == "malformed", (name, value)
    extra = json.dumps({**good, "every": 1}).encode()
    with pytest.raises(HeartbeatRefused):
        heartbeat.parse_have(heartbeat.HAVE_MAGIC + b"\0" * 64 + extra)
    payload = have(1, (M1, 3, 16)).payload()
    for token in (b"1e999", b"NaN", b'"\\ud800"'):
        bad = payload.replace(b"[3]", b"[" + token + b"]")
        assert bad != payload
        with pytest.raises(HeartbeatRefused) as exc:
            heartbeat.parse_have(heartbeat.HAVE_MAGIC + b"\0" * 64 + bad)
        assert exc.value.reason == "malformed", token
    with pytest.raises(HeartbeatRefused) as exc:
        heartbeat.parse_have(heartbeat.HAVE_MAGIC + b"\0" * 64 + b"[" * 2000)
    assert exc.value.reason == "oversize"


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=1400))
def test_no_have_datagram_counts_without_the_key(data: bytes) -> None:
    g = gate()
    head = have(1, (M1, 0, 16)).sign(SENDER)[:69]
    for datagram in (heartbeat.HAVE_MAGIC + data, head + data):
        try:
            got = g.check(datagram, 100.0, NOW_MS)
        except HeartbeatRefused:
            continue
        pytest.fail(f"counted without the member's signature: {got}")
