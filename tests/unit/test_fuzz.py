"""Property tests over every parser that reads the LAN (issue 7, point 8).

The targets, their strategies and the properties themselves live in tests/fuzz_targets.py,
shared with the long run `python -m bench.fuzz`. Here each parser gets FUZZ_EXAMPLES
fresh examples per CI run (not derandomized: every run explores new inputs; a failure
prints the input and a `@reproduce_failure` blob).

PXEPEER_FUZZ_EXAMPLES overrides the count (e.g. 500 for a quick local pass).
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import (
    BY_NAME,
    KNOWN_ANSWERS,
    TARGETS,
    NotBuilt,
    Parser,
    Target,
    check,
    memory_bound,
    traced_peak,
)

FUZZ_EXAMPLES = int(os.environ.get("PXEPEER_FUZZ_EXAMPLES", "10000"))
ROUND_TRIP_EXAMPLES = max(100, FUZZ_EXAMPLES // 20)
NAMES = [t.name for t in TARGETS]
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the checkout; failures print a reproduce blob
    print_blob=True,
    # Mutants of large documents are large and some parses slow on purpose (1e999, 5,000
    # digits, 3,000 brackets), and valid text is drawn through filters (printable names).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)  # fmt: skip


def built(target: Target) -> Parser:
    try:
        return target.parser()
    except NotBuilt as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", NAMES)
def test_no_exception_but_the_parsers_own_error_escapes(name: str) -> None:
    """Random bytes and mutated valid documents: the parser returns or raises its own
    error; what it returns can be used (logged, verified, negotiated) and re-encoded."""
    target = BY_NAME[name]
    parser = built(target)

    @FUZZ
    @given(target.strategy())
    def fuzz(data: bytes) -> None:
        check(parser, data)

    fuzz()


@pytest.mark.parametrize("name", NAMES)
def test_valid_documents_parse(name: str) -> None:
    """The structure-aware mutants start from documents the parser accepts; a sample it
    refuses would quietly turn them into random bytes."""
    target = BY_NAME[name]
    parser = built(target)
    for sample in target.samples():
        parser.parse(sample)  # raises (and fails the test) when refused
        check(parser, sample)


@pytest.mark.parametrize("name", [t.name for t in TARGETS if t.valid is not None])
def test_valid_values_round_trip_through_the_encoder(name: str) -> None:
    target = BY_NAME[name]
    parser = built(target)
    assert parser.encode is not None and target.valid is not None

    @settings(FUZZ, max_examples=ROUND_TRIP_EXAMPLES)
    @given(target.valid())
    def round_trip(value: object) -> None:
        assert parser.normal(parser.parse(parser.encode(value))) == parser.normal(value)

    round_trip()


@pytest.mark.parametrize("name", sorted(KNOWN_ANSWERS))
def test_well_formed_inputs_get_their_known_answer(name: str) -> None:
    parser = built(BY_NAME[name])

    @settings(FUZZ, max_examples=ROUND_TRIP_EXAMPLES)
    @given(KNOWN_ANSWERS[name]())
    def answer(case: tuple[bytes, object]) -> None:
        data, expected = case
        assert parser.parse(data) == expected

    answer()


@pytest.mark.parametrize("name", NAMES)
def test_inputs_claiming_huge_sizes_allocate_only_in_proportion_to_their_bytes(
    name: str,
) -> None:
    """A have-notice claiming 2^34 chunks, a manifest claiming a 10^15-byte file, a TFTP
    request for blksize 65464, ...: the parse (and what the caller does next) allocates
    at most `memory_bound(len(input))` at its peak (the bound is justified in
    tests/fuzz_targets.py: about 1 MiB for these inputs, against gigabytes claimed)."""
    target = BY_NAME[name]
    parser = built(target)
    inputs = target.adversarial()
    for data in inputs:  # warm caches (regexes, enums) outside the measurement
        check(parser, data)
    assert not tracemalloc.is_tracing()
    for data in inputs:
        peak = traced_peak(parser, data)
        assert peak <= memory_bound(len(data)), (name, data[:120], peak)


@pytest.mark.parametrize("name", NAMES)
def test_fuzzed_inputs_allocate_only_in_proportion_to_their_bytes(name: str) -> None:
    target = BY_NAME[name]
    parser = built(target)

    @settings(FUZZ, max_examples=max(100, FUZZ_EXAMPLES // 20))
    @given(target.strategy())
    def bounded(data: bytes) -> None:
        assert traced_peak(parser, data) <= memory_bound(len(data))

    bounded()


# --- bugs the fuzzer found, pinned ---------------------------------------------------------


def test_dhcp_vendor_class_with_an_overlong_architecture_is_no_architecture() -> None:
    """Found by the DHCP target: "PXEClient:Arch:<4400 digits>" split over repeated
    option 60s (RFC 3396) made int() raise ValueError out of parse_client. Requests are
    now also capped in size; an architecture code is 16 bits, and more digits than that
    are no code at all, whatever the length."""
    from pxe.dhcp import MalformedPacket, parse_client

    def request(arch: bytes) -> bytes:
        header = bytearray(240)
        header[0:3] = b"\x01\x01\x06"
        header[236:240] = b"\x63\x82\x53\x63"
        vendor = b"PXEClient:Arch:" + arch
        options = b"".join(
            bytes([60, len(vendor[i : i + 250])]) + vendor[i : i + 250]
            for i in range(0, len(vendor), 250)
        )
        return bytes(header) + b"\x35\x01\x01" + options + b"\xff"

    with pytest.raises(MalformedPacket):
        parse_client(request(b"9" * 4400))
    info = parse_client(request(b"9" * 1000))
    assert info.arch_code is None and info.arch is None
    assert parse_client(request(b"00007:UNDI:003016")).arch_code == 7


def test_plan_parse_splits_lines_at_newlines_only_like_the_agent() -> None:
    """Found by the plan round trip: a version holding \\x1e (or a name holding \\x85 or
    \\u2028) is one line for the agent's `read -r` but was two for splitlines()."""
    from imaging.plan import Plan, PlanChunk

    sha = "0" * 64
    for odd in ("\x1e", "\x85", "\u2028", "\x0c"):
        plan = Plan(sha, f"name{odd}x", f"v{odd}", 4, sha, 4096, ("http://10.0.0.2:8080",),
                    (PlanChunk(0, 4, sha, False, (0,)),))  # fmt: skip
        assert Plan.parse(plan.render()) == plan


def test_plan_parse_refuses_an_empty_disk_size_as_a_plan_error() -> None:
    """Found by the plan target: `disk  ` and `chunk_size` with no value passed the line
    checks and int('') raised ValueError out of Plan.parse."""
    from imaging.plan import FORMAT_LINE, Plan, PlanError

    sha = "0" * 64
    for disk, chunk_size in ((" ", "4096"), (f"1 {sha}", ""), (f"x {sha}", "4096")):
        with pytest.raises(PlanError):
            Plan.parse(f"{FORMAT_LINE}\nimage {sha} 1 n\ndisk {disk}\nchunk_size {chunk_size}\n"
                       "end 0\n")  # fmt: skip
