"""Hostile input for the control document parser (imaging/control.py), with the machinery
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
from tests.fuzz_targets import (
    NOW,
    Parser,
    Target,
    _texts,
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
