"""HTTP Range decisions for image files (peer/api/byte_range.py), without a server."""

from __future__ import annotations

import pytest

from peer.api.byte_range import MAX_HEADER_CHARS, RangeNotSatisfiable, parse_range

ETAG = '"' + "ab" * 32 + '"'
SIZE = 10_000


def refused(range_header: str, size: int = SIZE, if_range: str | None = None) -> str:
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(range_header, if_range, ETAG, size)
    return caught.value.reason


def test_no_range_header_sends_the_whole_file() -> None:
    assert parse_range(None, None, ETAG, SIZE) is None


def test_closed_range_is_half_open_and_inclusive_of_its_end() -> None:
    assert parse_range("bytes=0-0", None, ETAG, SIZE) == (0, 1)
    assert parse_range("bytes=100-199", None, ETAG, SIZE) == (100, 200)


def test_open_ended_range_runs_to_the_end_of_the_file() -> None:
    assert parse_range("bytes=9000-", None, ETAG, SIZE) == (9000, SIZE)


def test_end_past_the_file_is_clamped_to_its_last_byte() -> None:
    assert parse_range("bytes=9990-123456789", None, ETAG, SIZE) == (9990, SIZE)


def test_suffix_range_is_the_last_n_bytes_and_a_long_suffix_is_the_whole_file() -> None:
    assert parse_range("bytes=-10", None, ETAG, SIZE) == (SIZE - 10, SIZE)
    assert parse_range("bytes=-99999", None, ETAG, SIZE) == (0, SIZE)


def test_unit_is_case_insensitive_and_surrounding_blanks_are_tolerated() -> None:
    assert parse_range(" Bytes=5-9 ", None, ETAG, SIZE) == (5, 10)


def test_matching_if_range_honours_the_range() -> None:
    assert parse_range("bytes=5-9", ETAG, ETAG, SIZE) == (5, 10)


@pytest.mark.parametrize(
    "validator",
    ['"' + "cd" * 32 + '"', "W/" + ETAG, "Wed, 21 Oct 2015 07:28:00 GMT", ""],
)
def test_if_range_naming_anything_but_our_etag_sends_the_whole_file(validator: str) -> None:
    # A resumed download of another file (or another version) must never be spliced.
    assert parse_range("bytes=5-9", validator, ETAG, SIZE) is None
    assert parse_range("bytes=garbage", validator, ETAG, SIZE) is None


def test_unknown_range_unit_is_ignored_not_refused() -> None:
    assert parse_range("items=0-5", None, ETAG, SIZE) is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("bytes=0-1,5-9", "multiple_ranges"),
        ("bytes=" + "0-1," * 40 + "0-1", "multiple_ranges"),
        ("bytes=9-5", "reversed"),
        ("bytes=10000-", "past_end"),
        ("bytes=10000-20000", "past_end"),
        ("bytes=-0", "empty_suffix"),
        ("bytes=-", "malformed"),
        ("bytes=", "malformed"),
        ("bytes=5", "malformed"),
        ("bytes=a-b", "malformed"),
        ("bytes=1-2-3", "malformed"),
        ("bytes=+1-2", "malformed"),
        ("bytes=0x10-20", "malformed"),
        ("bytes=\u0663-\u0665", "malformed"),  # Arabic-Indic digits parse with int()
        ("bytes 0-5", "malformed"),
        ("", "malformed"),
    ],
)
def test_bad_ranges_are_refused_with_a_fixed_reason(header: str, reason: str) -> None:
    assert refused(header) == reason


def test_a_header_over_the_cap_is_refused_before_it_is_parsed() -> None:
    header = "bytes=" + "0" * (MAX_HEADER_CHARS - len("bytes=") - 2) + "-1"
    assert len(header) == MAX_HEADER_CHARS
    assert parse_range(header, None, ETAG, SIZE) == (0, 2)
    assert refused(header + "0") == "too_long"
    assert refused("bytes=0-" + "9" * 5000) == "too_long"


def test_every_range_of_an_empty_file_is_unsatisfiable() -> None:
    assert refused("bytes=0-", size=0) == "past_end"
    assert refused("bytes=-5", size=0) == "past_end"
    assert parse_range(None, None, ETAG, 0) is None


def test_every_answer_lies_inside_the_file() -> None:
    for header in ("bytes=0-", "bytes=3-4", "bytes=-1", "bytes=-7", "bytes=6-100"):
        for size in (1, 2, 7, 8):
            try:
                start, stop = parse_range(header, None, ETAG, size)  # type: ignore[misc]
            except RangeNotSatisfiable:
                continue
            assert 0 <= start < stop <= size
