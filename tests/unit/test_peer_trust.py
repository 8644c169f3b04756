"""Node certificates, signed peer requests and machine records, as pure code: who may
sign what, and why a replayed, redirected, stale or altered message is refused."""

from __future__ import annotations

import base64
import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.signing import PublicKey, SigningKey
from peer.core.identity import (
    CertificateCache,
    EnrollRequest,
    IdentityError,
    NodeCertificate,
    node_id_of,
)
from peer.core.machine_records import (
    MachineState,
    Record,
    RecordBook,
    RecordError,
    RecordVerifier,
    SignedRecord,
    imaged_record,
    next_assignment,
    parse_book,
)
from peer.core.peer_auth import (
    AUTH_HEADER,
    WINDOW_MS,
    AuthError,
    ClockOffsets,
    ReplayGuard,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

NOW_MS = 1_800_000_000_000
MAC = "52:54:00:12:34:56"
MANIFEST = "ab" * 32


def new_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


ENROLL = new_key()
ENROLL_KEYS = {ENROLL.key_id: PublicKey(ENROLL.public_key.raw, "", "enroll")}


def enrolled(label: str = "") -> tuple[SigningKey, NodeCertificate]:
    key = new_key()
    return key, NodeCertificate.issue(key.public_key, label, NOW_MS // 1000, ENROLL)


A_KEY, A_CERT = enrolled("a")
B_KEY, B_CERT = enrolled("b")


# -- identities and certificates ----------------------------------------------------------


def test_a_node_id_is_the_key_id_of_its_public_key() -> None:
    assert A_CERT.node_id == node_id_of(A_KEY.public_key) == A_KEY.key_id


def test_a_certificate_round_trips_and_verifies_against_its_enroll_key() -> None:
    parsed = NodeCertificate.from_bytes(A_CERT.to_bytes())
    assert parsed.verify(ENROLL_KEYS) == A_KEY.key_id
    assert parsed.label == "a"


def test_a_certificate_from_an_untrusted_key_or_with_a_changed_byte_is_refused() -> None:
    other = new_key()
    foreign = NodeCertificate.issue(A_KEY.public_key, "a", 0, other)
    with pytest.raises(IdentityError) as untrusted:
        foreign.verify(ENROLL_KEYS)
    assert untrusted.value.reason == "untrusted issuer"
    doc = json.loads(A_CERT.to_bytes())
    doc["certificate"]["label"] = "b"
    with pytest.raises(IdentityError) as altered:
        NodeCertificate.from_bytes(json.dumps(doc).encode()).verify(ENROLL_KEYS)
    assert altered.value.reason == "bad signature"


def test_a_certificate_claiming_another_node_id_than_its_key_is_refused() -> None:
    doc = json.loads(A_CERT.to_bytes())
    doc["certificate"]["node_id"] = B_KEY.key_id
    with pytest.raises(IdentityError) as refused:
        NodeCertificate.from_bytes(json.dumps(doc).encode())
    assert refused.value.reason == "bad node id"


def test_any_bytes_give_a_certificate_or_an_identity_error() -> None:
    data = A_CERT.to_bytes()
    rng = random.Random(8)
    for _ in range(2000):
        mutated = bytearray(data[: rng.randrange(len(data) + 1)])
        if mutated and rng.random() < 0.7:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            NodeCertificate.from_bytes(bytes(mutated))
        except IdentityError:
            pass


def test_a_signing_request_proves_its_key_and_is_signed_into_a_certificate() -> None:
    node = new_key()
    request = EnrollRequest.from_bytes(EnrollRequest.make(node, "till 3", 1).to_bytes())
    assert request.node_id == node.key_id
    # A request for someone else's key (the proof made by another key) is refused.
    forged = json.loads(EnrollRequest.make(node, "till 3", 1).to_bytes())
    forged["request"]["node_key"] = base64.b64encode(A_KEY.public_key.raw).decode()
    forged["request"]["node_id"] = A_KEY.key_id
    with pytest.raises(IdentityError) as refused:
        EnrollRequest.from_bytes(json.dumps(forged).encode())
    assert refused.value.reason == "bad proof"


# -- signed requests ------------------------------------------------------------------------


def request_from_a(to: str, t: int = NOW_MS, nonce: str = "0" * 32, body: bytes = b"{}",
                   path: str = "/v1/have") -> dict[str, str]:  # fmt: skip
    return sign_request(A_KEY, A_CERT.to_bytes(), "POST", path, body, to, t, nonce)


def check_at_b(headers: dict[str, str], guard: ReplayGuard | None, body: bytes = b"{}",
               now_ms: int = NOW_MS, path: str = "/v1/have") -> str:  # fmt: skip
    certs = CertificateCache(ENROLL_KEYS)
    return verify_request(headers, "POST", path, body, B_KEY.key_id, certs, now_ms,
                          guard).node_id  # fmt: skip


def reason(call) -> str:
    with pytest.raises(AuthError) as refused:
        call()
    return refused.value.reason


def test_a_signed_request_names_its_sender() -> None:
    guard = ReplayGuard(NOW_MS - 10_000)
    assert check_at_b(request_from_a(B_KEY.key_id), guard) == A_KEY.key_id


def test_a_replayed_request_is_refused_in_the_window_and_after_it() -> None:
    guard = ReplayGuard(NOW_MS - 10_000)
    headers = request_from_a(B_KEY.key_id)
    check_at_b(headers, guard)
    assert reason(lambda: check_at_b(headers, guard)) == "replayed"
    later = NOW_MS + WINDOW_MS + 1
    assert reason(lambda: check_at_b(headers, guard, now_ms=later)) == "stale"


def test_a_request_from_before_a_restart_is_refused() -> None:
    restarted = ReplayGuard(NOW_MS + 5_000)  # its nonce cache is empty again
    assert reason(lambda: check_at_b(request_from_a(B_KEY.key_id), restarted,
                                     now_ms=NOW_MS + 6_000)) == "stale"  # fmt: skip


def test_a_request_for_another_peer_or_with_a_changed_body_or_path_is_refused() -> None:
    guard = ReplayGuard(NOW_MS - 10_000)
    assert reason(lambda: check_at_b(request_from_a("f" * 16), guard)) == "wrong target"
    headers = request_from_a(B_KEY.key_id, nonce="1" * 32)
    assert reason(lambda: check_at_b(headers, guard, body=b'{"x":1}')) == "bad signature"
    headers = request_from_a(B_KEY.key_id, nonce="2" * 32)
    assert reason(lambda: check_at_b(headers, guard, path="/v1/records")) == "bad signature"


def test_a_request_from_a_node_no_trusted_enroll_key_vouches_for_is_refused() -> None:
    stranger = new_key()
    cert = NodeCertificate.issue(stranger.public_key, "", 0, new_key())
    headers = sign_request(stranger, cert.to_bytes(), "POST", "/v1/have", b"{}",
                           B_KEY.key_id, NOW_MS, "3" * 32)  # fmt: skip
    assert reason(lambda: check_at_b(headers, ReplayGuard(0))) == "untrusted issuer"
    unsigned = {k: v for k, v in headers.items() if k != AUTH_HEADER}
    assert reason(lambda: check_at_b(unsigned, ReplayGuard(0))) == "no signature"


def test_hello_requests_are_accepted_whatever_their_time_but_state_changes_are_not() -> None:
    headers = sign_request(A_KEY, A_CERT.to_bytes(), "GET", "/v1/peer", b"", "*",
                           NOW_MS - 10**9, "4" * 32)  # fmt: skip
    certs = CertificateCache(ENROLL_KEYS)
    assert verify_request(headers, "GET", "/v1/peer", b"", B_KEY.key_id, certs, NOW_MS,
                          None).node_id == A_KEY.key_id  # fmt: skip
    assert (
        reason(
            lambda: verify_request(
                headers, "GET", "/v1/peer", b"", B_KEY.key_id, certs, NOW_MS, ReplayGuard(0)
            )
        )
        == "wrong target"
    )


def test_a_response_is_bound_to_the_request_it_answers() -> None:
    certs = CertificateCache(ENROLL_KEYS)
    headers = sign_response(B_KEY, B_CERT.to_bytes(), "5" * 32, 200, b"hello", NOW_MS)
    cert, their_ms = verify_response(headers, "5" * 32, 200, b"hello", certs)
    assert cert.node_id == B_KEY.key_id and their_ms == NOW_MS
    assert reason(lambda: verify_response(headers, "6" * 32, 200, b"hello", certs)) == "replayed"
    assert reason(lambda: verify_response(headers, "5" * 32, 200, b"hellO", certs)) == (
        "bad signature"
    )


def test_requests_are_timed_in_the_receivers_clock() -> None:
    offsets = ClockOffsets()
    offsets.learn("b", their_ms=NOW_MS + 3_600_000, sent_ms=NOW_MS - 10, received_ms=NOW_MS + 10)
    assert offsets.their_time("b", NOW_MS) == NOW_MS + 3_600_000
    assert offsets.their_time("c", NOW_MS) == NOW_MS


# -- machine records ------------------------------------------------------------------------


def signed(record: Record, key: SigningKey) -> SignedRecord:
    return SignedRecord.sign(record, key)


def verifier_for(own: SigningKey) -> RecordVerifier:
    return RecordVerifier(own.public_key, CertificateCache(ENROLL_KEYS))


CERTS = {A_KEY.key_id: A_CERT.to_bytes(), B_KEY.key_id: B_CERT.to_bytes()}


def test_books_that_saw_the_same_records_in_any_order_are_equal() -> None:
    book = RecordBook()
    first = next_assignment(book, MAC, "pos", False, 100, A_KEY.key_id)
    assert first is not None
    records = [
        signed(first, A_KEY),
        signed(imaged_record(MAC, 1, "pos 1", MANIFEST, 200, B_KEY.key_id), B_KEY),
        signed(Record("assignment", MAC, 2, "pos", None, 300, B_KEY.key_id), B_KEY),
        signed(Record("assignment", MAC, 2, "kiosk", None, 300, A_KEY.key_id), A_KEY),
    ]
    digests = set()
    for seed in range(6):
        order = records[:]
        random.Random(seed).shuffle(order)
        book = RecordBook()
        for record in order:
            book.merge([record], CERTS, verifier_for(A_KEY))
        digests.add(book.digest())
        # Generation 2 ties on time: the higher node id's record wins, everywhere.
        expected = "pos" if B_KEY.key_id > A_KEY.key_id else "kiosk"
        assert book.machine(MAC).assigned == expected
    assert len(digests) == 1


def test_an_imaged_machine_stays_imaged_until_it_is_assigned_again() -> None:
    book = RecordBook()
    verifier = verifier_for(A_KEY)
    first = next_assignment(book, MAC, "pos", False, 100, A_KEY.key_id)
    assert first is not None
    book.merge([signed(first, A_KEY)], {}, verifier)
    assert not book.machine(MAC).imaged_for_assignment
    book.merge([signed(imaged_record(MAC, 1, "pos 1", MANIFEST, 200, B_KEY.key_id), B_KEY)],
               CERTS, verifier)  # fmt: skip
    assert book.machine(MAC).imaged_for_assignment
    # The same assignment again changes nothing; --again makes a new generation.
    assert next_assignment(book, MAC, "pos", False, 300, A_KEY.key_id) is None
    again = next_assignment(book, MAC, "pos", True, 300, A_KEY.key_id)
    assert again is not None and again.generation == 2
    book.merge([signed(again, A_KEY)], {}, verifier)
    assert book.machine(MAC) == MachineState(MAC, "pos", 2, book.get(MAC, "imaged"))
    assert not book.machine(MAC).imaged_for_assignment


def test_records_by_strangers_forged_or_altered_are_refused_and_counted() -> None:
    stranger = new_key()
    stranger_cert = NodeCertificate.issue(stranger.public_key, "", 0, new_key())
    done = imaged_record(MAC, 1, "pos 1", MANIFEST, 200, stranger.key_id)
    book = RecordBook()
    _, refused = book.merge([signed(done, stranger)], {stranger.key_id: stranger_cert.to_bytes()},
                            verifier_for(A_KEY))  # fmt: skip
    assert refused == {"untrusted signer": 1} and len(book) == 0
    # B's record, altered after B signed it.
    real = signed(imaged_record(MAC, 1, "pos 1", MANIFEST, 200, B_KEY.key_id), B_KEY)
    altered = SignedRecord(imaged_record(MAC, 9, "pos 1", MANIFEST, 200, B_KEY.key_id),
                           real.signature)  # fmt: skip
    _, refused = book.merge([altered], CERTS, verifier_for(A_KEY))
    assert refused == {"bad signature": 1} and len(book) == 0
    # A record naming B, signed by A.
    forged = SignedRecord(real.record, signed(real.record.__class__(**{
        **real.record.__dict__, "by": A_KEY.key_id}), A_KEY).signature)  # fmt: skip
    _, refused = book.merge([forged], CERTS, verifier_for(A_KEY))
    assert refused == {"bad signature": 1}


def test_a_book_round_trips_and_hostile_books_are_record_errors() -> None:
    book = RecordBook()
    first = next_assignment(book, MAC, "pos", False, 100, B_KEY.key_id)
    assert first is not None
    book.merge([signed(first, B_KEY)], CERTS, verifier_for(A_KEY))
    records, certs = parse_book(book.to_bytes())
    copy = RecordBook()
    copy.merge(records, certs, verifier_for(A_KEY))
    assert copy.digest() == book.digest() != ""
    data = book.to_bytes()
    rng = random.Random(3)
    for _ in range(2000):
        mutated = bytearray(data[: rng.randrange(len(data) + 1)])
        if mutated and rng.random() < 0.7:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            parse_book(bytes(mutated))
        except RecordError:
            pass


def test_a_newer_peers_record_kind_is_passed_over_and_the_rest_of_its_book_taken() -> None:
    book = RecordBook()
    first = next_assignment(book, MAC, "pos", False, 100, B_KEY.key_id)
    assert first is not None
    book.merge([signed(first, B_KEY)], CERTS, verifier_for(A_KEY))
    doc = json.loads(book.to_bytes())
    newer = json.loads(json.dumps(doc["records"][0]))
    newer["record"]["kind"] = "wake-on-lan"
    doc["records"].insert(0, newer)
    records, _ = parse_book(json.dumps(doc).encode())
    assert [r.record.kind for r in records] == ["assignment"]
    # A kind that is no name at all is still a hostile book.
    newer["record"]["kind"] = "<" * 40
    with pytest.raises(RecordError, match="bad kind"):
        parse_book(json.dumps(doc).encode())


def test_records_in_the_stores_own_file_that_no_certificate_vouches_for_are_taken_over(
    tmp_path,
) -> None:
    from dataclasses import replace

    from peer.store.record_store import RecordStore

    prepared = new_key()  # e.g. `pxepeer assign` in a store prepared before enrollment
    first = next_assignment(RecordBook(), MAC, "pos", False, 100, prepared.key_id)
    assert first is not None
    source = RecordBook()
    RecordStore(tmp_path, RecordVerifier(prepared.public_key, None)).add(
        source, [signed(first, prepared)], {}
    )
    # Without adoption (a peer's book is never adopted) the record is refused.
    strict = RecordBook()
    RecordStore(tmp_path, verifier_for(A_KEY)).load(strict)
    assert len(strict) == 0
    book = RecordBook()
    store = RecordStore(
        tmp_path,
        verifier_for(A_KEY),
        adopt=lambda r: SignedRecord.sign(replace(r, by=A_KEY.key_id), A_KEY),
    )
    store.load(book)
    assert book.machine(MAC).assigned == "pos"
    assert book.get(MAC, "assignment").by == A_KEY.key_id  # type: ignore[union-attr]
    # Taken over once: the file now holds the record in this node's name.
    again = RecordBook()
    RecordStore(tmp_path, verifier_for(A_KEY)).load(again)
    assert again.digest() == book.digest()
