"""Hostile input for the control document parser (imaging/control.py) and for record books
holding site overrides (peer/core/machine_records.py), with the machinery
of tests/fuzz_targets.py: random bytes and structure-aware mutants of signed documents
(1e999, NaN, lone surrogates, deep nesting, wrong types, keys dropped or repeated). Only
ControlError escapes the parse; what parses can be verified (only ControlRejected then),
applied to a catalog entry and re-encoded to itself; memory stays in proportion to the
input, whatever sizes it claims.

PXEPEER_FUZZ_EXAMPLES scales the count as for tests/unit/test_fuzz.py (a fifth of it
here: one parser, and CI time is short)."""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from imaging.catalog import CatalogEntry
from imaging.control import effective
from tests.fuzz_targets import (
    NOW,
    Parser,
    Target,
    _records_adversarial,
    _records_build,
    _texts,
    _throwaway_keys,
    check,
    memory_bound,
    mutate_json,
    throwaway_key,
    traced_peak,
)

EXAMPLES = max(200, int(os.environ.get("PXEPEER_FUZZ_EXAMPLES", "10000")) // 5)
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)  # fmt: skip


def _build() -> Parser:
    from imaging.control import (
        ControlError,
        ControlRejected,
        ControlTrust,
        SignedControl,
        accept_control,
        effective,
    )

    trust = ControlTrust([throwaway_key().public_key])

    def use(signed: Any, _data: bytes) -> None:
        # What a peer does next: verify it, then apply it to the catalog's entries.
        control = signed.control
        for entry in control.entries[:4]:
            effective(CatalogEntry(entry.name, "1", "0" * 64), control, entry)
        accept_control(signed, trust, None, NOW)

    return Parser(SignedControl.from_bytes, (ControlError,), use=use,
                  use_errors=(ControlRejected,), encode=lambda s: s.to_bytes())  # fmt: skip


def _valid() -> SearchStrategy[Any]:
    from imaging.control import Control, ControlEntry, SignedControl

    entry = st.builds(
        ControlEntry,
        name=_texts,
        paused=st.one_of(st.none(), st.booleans()),
        priority=st.one_of(st.none(), st.integers(-1_000_000, 1_000_000)),
    ).filter(lambda e: e.paused is not None or e.priority is not None)
    control = st.builds(
        Control,
        serial=st.integers(1, 2**53 - 1),
        issued=st.integers(0, NOW),
        expires=st.integers(NOW, NOW + 10**8),
        entries=st.lists(entry, max_size=6, unique_by=lambda e: e.name).map(tuple),
    )
    return control.map(lambda c: SignedControl.sign(c, throwaway_key()))


@cache
def _samples() -> list[bytes]:
    from imaging.control import Control, ControlEntry, SignedControl

    entries = (ControlEntry("demo-os", True, None), ControlEntry("imager", None, -3),
               ControlEntry("pos", False, 7))  # fmt: skip
    controls = [Control(n + 1, NOW - 60, NOW + 86400, entries[:n]) for n in range(4)]
    return [SignedControl.sign(c, throwaway_key()).to_bytes() for c in controls]


def _adversarial() -> list[bytes]:
    entry = {"name": "x", "paused": True, "priority": 10**18}
    docs = [
        {"format": "pxepeer-control/1", "serial": 2**63, "issued": 0, "expires": 10**15,
         "images": [entry]},
        {"format": "pxepeer-control/1", "serial": 1, "issued": 0, "expires": 10**15,
         "images": [{"name": "x", "paused": None, "priority": None}] * 300},
    ]  # fmt: skip
    out = [json.dumps({"control": d, "signatures": []}).encode() for d in docs]
    out.append(b'{"control": ' + b"[" * 3000 + b"]" * 3000 + b', "signatures": []}')
    out.append(b'{"control": {}, "signatures": [' + b"{}," * 2000 + b"{}]}")
    return out


TARGET = Target("control", "imaging.control:SignedControl.from_bytes", _build, _samples,
                mutate_json, _adversarial, _valid)  # fmt: skip


def test_only_control_error_escapes_and_what_parses_verifies_and_round_trips() -> None:
    parser = TARGET.parser()

    @FUZZ
    @given(TARGET.strategy(fresh_valid=50))
    def fuzz(data: bytes) -> None:
        check(parser, data)

    fuzz()


def test_the_samples_parse_so_the_mutants_start_from_valid_documents() -> None:
    parser = TARGET.parser()
    for sample in _samples():
        assert parser.parse(sample) is not None
        check(parser, sample)


def test_inputs_claiming_huge_sizes_allocate_only_in_proportion() -> None:
    parser = TARGET.parser()
    for data in _adversarial():
        check(parser, data)  # warm caches outside the measurement
    for data in _adversarial():
        assert traced_peak(parser, data) <= memory_bound(len(data)), data[:80]


# -- record books with site overrides (the peer protocol's /v1/records) ---------------------


@cache
def _book_samples() -> list[bytes]:
    from peer.core.identity import NodeCertificate
    from peer.core.machine_records import (
        Record,
        RecordBook,
        RecordVerifier,
        SignedRecord,
        next_override,
    )

    enroll, node = _throwaway_keys()
    cert = NodeCertificate.issue(node.public_key, "p", NOW, enroll).to_bytes()
    book = RecordBook()
    made = [Record("assignment", "52:54:00:00:00:01", 1, "pos", None, NOW, node.key_id)]
    for name, paused, priority in (("pos", True, None), ("imager", None, -4), ("x", False, 9)):
        made.append(next_override(book, name, paused, priority, frozenset(), NOW, node.key_id))
    book.merge([SignedRecord.sign(r, node) for r in made], {node.key_id: cert},
               RecordVerifier(node.public_key, None))  # fmt: skip
    return [book.to_bytes()]


def _book_adversarial() -> list[bytes]:
    doc = json.loads(_book_samples()[0])
    entry = next(e for e in doc["records"] if e["record"]["kind"] == "override")
    huge = dict(doc, records=[dict(entry, record=dict(entry["record"], priority=10**300))])
    return [json.dumps(dict(doc, records=[entry] * 2000)).encode(), json.dumps(huge).encode(),
            *_records_adversarial()]  # fmt: skip


def _book_build() -> Parser:
    """The record book target of tests/fuzz_targets.py, plus what a peer does with a
    book's overrides: every parsed record merged (signatures aside) and turned into the
    overrides the site core applies."""
    from peer.core.machine_records import RecordBook, RecordVerifier

    class AnySigner(RecordVerifier):
        def check(self, signed: Any, cert_bytes: bytes | None) -> None:
            pass

    base = _records_build()

    def use(parsed: Any, data: bytes) -> None:
        assert base.use is not None
        base.use(parsed, data)
        book = RecordBook()
        book.merge(parsed[0], parsed[1], AnySigner(None, None))
        for name, entry in book.overrides().items():
            effective(CatalogEntry(name, "1", "0" * 64), None, entry)
        book.to_bytes()

    return Parser(base.parse, base.errors, use=use)


BOOK = Target("records-override", "peer.core.machine_records:parse_book", _book_build,
              _book_samples, mutate_json, _book_adversarial)  # fmt: skip


def test_books_with_overrides_raise_only_record_error_and_merge_safely() -> None:
    parser = BOOK.parser()
    for sample in _book_samples():
        assert len(parser.parse(sample)[0]) == 4
        check(parser, sample)

    @FUZZ
    @given(BOOK.strategy())
    def fuzz(data: bytes) -> None:
        check(parser, data)

    fuzz()
    for data in _book_adversarial():
        check(parser, data)
        assert traced_peak(parser, data) <= memory_bound(len(data)), data[:80]
