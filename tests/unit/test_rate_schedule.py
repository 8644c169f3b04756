"""`--wan-rate` / `--lan-rate` schedules: the parser, rate_at at window edges, midnight
wraps and weekdays, the next change, and throttles that follow the schedule with an
injected clock (no sleeping)."""

from __future__ import annotations

import string
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.adapters.origin import OriginClient
from peer.core.rate_schedule import (
    Entry,
    RateSchedule,
    ScheduleError,
    format_rate,
    limit_status,
    parse_schedule,
)
from peer.core.throttle import ScheduledBucket, ScheduledRate
from peer.serve import parse_rate
from peer.status_view import render_status

MBIT = 1e6 / 8
# 2026-11-30 is a Monday.
MON = datetime(2026, 11, 30)


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    """Monday 2026-11-30 + `day` days, at hh:mm:ss local time."""
    return MON + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


# -- every rate --wan-rate took before is read as before ---------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20Mbit", 2.5e6),
        ("2.5MB", 2.5e6),
        ("500k", 5e5),
        ("20 Mbit/s", 2.5e6),
        ("8Mbps", 1e6),
        ("1Gbit", 1.25e8),
        ("100kb", 12500.0),
        ("1.5G", 1.5e9),
        (" 64kB/s ", 64000.0),
        ("3", 3.0),
    ],
)
def test_a_plain_rate_is_one_constant_rate_as_before(text: str, expected: float) -> None:
    schedule = parse_schedule(text)
    assert schedule.is_constant
    assert schedule.rate_at(at(0, 12)) == expected
    assert schedule.next_change(at(0, 12)) is None
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0", "0.0", " 0 ", "0Mbit"])
def test_zero_is_no_cap(text: str) -> None:
    assert parse_schedule(text).rate_at(at(3, 4)) is None
    assert parse_rate(text) == 0.0


# -- windows --------------------------------------------------------------------------


def test_opening_hours_window_is_half_open() -> None:
    s = parse_schedule("2Mbit/s 08:00-20:00, 50Mbit/s")
    assert s.rate_at(at(0, 7, 59, 59)) == 50 * MBIT
    assert s.rate_at(at(0, 8)) == 2 * MBIT
    assert s.rate_at(at(0, 19, 59, 59)) == 2 * MBIT
    assert s.rate_at(at(0, 20)) == 50 * MBIT
    assert s.next_change(at(0, 9, 30)) == at(0, 20)
    assert s.next_change(at(0, 20)) == at(1, 8)
    assert s.next_change(at(0, 7, 59, 59)) == at(0, 8)


def test_a_window_ending_before_it_starts_wraps_past_midnight() -> None:
    s = parse_schedule("50Mbit 22:00-06:00, 2Mbit")
    assert s.rate_at(at(0, 21, 59)) == 2 * MBIT
    assert s.rate_at(at(0, 22)) == 50 * MBIT
    assert s.rate_at(at(1, 0)) == 50 * MBIT
    assert s.rate_at(at(1, 5, 59)) == 50 * MBIT
    assert s.rate_at(at(1, 6)) == 2 * MBIT
    assert s.next_change(at(0, 23)) == at(1, 6)


def test_weekdays_limit_a_window_and_a_wrapping_window_belongs_to_its_start_day() -> None:
    s = parse_schedule("2Mbit Mon-Fri 08:00-18:00, 1Mbit fri 22:00-02:00, 10Mbit Sat+Sun, 0")
    assert s.rate_at(at(0, 9)) == 2 * MBIT  # Monday
    assert s.rate_at(at(4, 17, 59)) == 2 * MBIT  # Friday
    assert s.rate_at(at(4, 23)) == 1 * MBIT  # Friday night
    assert s.rate_at(at(5, 1, 59)) == 1 * MBIT  # ...into Saturday: the Friday window wins
    assert s.rate_at(at(5, 2)) == 10 * MBIT  # Saturday
    assert s.rate_at(at(6, 23, 59)) == 10 * MBIT  # Sunday
    assert s.rate_at(at(7, 7)) is None  # Monday 07:00: the default, no cap
    assert s.rate_at(at(3, 23)) is None  # Thursday night: no Thursday window
    assert s.next_change(at(4, 20)) == at(4, 22)
    assert s.next_change(at(5, 3)) == at(7, 0)  # the weekend ends at Monday midnight


def test_day_ranges_wrap_and_lists_join_with_plus() -> None:
    s = parse_schedule("1Mbit Fri-Mon, 2Mbit Tue+Thu 00:00-24:00, 0")
    assert [s.rate_at(at(d, 12)) for d in range(7)] == [
        1 * MBIT, 2 * MBIT, None, 2 * MBIT, 1 * MBIT, 1 * MBIT, 1 * MBIT,
    ]  # fmt: skip


def test_where_windows_overlap_the_first_written_wins() -> None:
    s = parse_schedule("1Mbit 09:00-10:00, 3Mbit 08:00-12:00, 5Mbit")
    assert s.rate_at(at(0, 9, 30)) == 1 * MBIT
    assert s.rate_at(at(0, 8, 30)) == 3 * MBIT
    assert s.rate_at(at(0, 10, 30)) == 3 * MBIT
    assert s.next_change(at(0, 8, 30)) == at(0, 9)


def test_adjacent_windows_with_the_same_rate_are_not_a_change() -> None:
    s = parse_schedule("1Mbit 08:00-12:00, 1Mbit 12:00-14:00, 5Mbit")
    assert s.next_change(at(0, 9)) == at(0, 14)


def test_a_schedule_that_never_changes_has_no_next_change() -> None:
    assert parse_schedule("1Mbit Mon-Sun, 2Mbit").next_change(at(0, 1)) is None


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty entry"),
        ("fast", "bad entry"),
        ("2Mbit 08:00-20:00", "no default"),
        ("2Mbit, 3Mbit", "two defaults"),
        ("2Mbit 08:00-25:00, 0", "bad time"),
        ("2Mbit 24:00-06:00, 0", "bad time"),
        ("2Mbit 08:60-09:00, 0", "bad time"),
        ("2Mbit 08:00-08:00, 0", "empty window"),
        ("2Mbit Mon-Fri, , 0", "empty entry"),
        ("2Mbit Monday 08:00-09:00, 0", "bad entry"),
        ("2Mbit 8-9, 0", "bad entry"),
        ("2Mbit, 0,", "empty entry"),
        ("9" * 400, "bad rate"),
        (",".join(["1Mbit Mon"] * 40), "too many entries"),
    ],
)
def test_bad_schedules_fail_with_a_reason_and_one_line(text: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "--lan-rate")
    assert caught.value.reason == reason
    message = str(caught.value)
    assert message.startswith("--lan-rate ") and "\n" not in message


# -- properties -------------------------------------------------------------------------

rates = st.one_of(
    st.none(),
    st.floats(min_value=1e-3, max_value=1e13, allow_nan=False, allow_infinity=False),
)
minutes = st.integers(0, 24 * 60 - 1)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    days = draw(st.one_of(st.none(), st.frozensets(st.integers(0, 6), min_size=1)))
    window = draw(st.one_of(st.none(), st.tuples(minutes, st.integers(1, 24 * 60))))
    if window is not None and window[0] == window[1]:
        window = None
    if days is None and window is None:
        days = frozenset({draw(st.integers(0, 6))})
    start, end = window if window else (None, None)
    return Entry(draw(rates), days, start, end)


@st.composite
def schedules(draw: st.DrawFn) -> RateSchedule:
    rules = draw(st.lists(entries(), max_size=6))
    position = draw(st.integers(0, len(rules)))
    rules.insert(position, Entry(draw(rates)))
    return RateSchedule(tuple(rules))


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_rendering_a_schedule_parses_back_to_the_same_schedule(schedule: RateSchedule) -> None:
    again = parse_schedule(str(schedule))
    assert again.entries == schedule.entries


@settings(max_examples=100, deadline=None)
@given(schedules(), st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_the_rate_is_constant_until_the_next_change(schedule: RateSchedule, when: datetime) -> None:
    rate = schedule.rate_at(when)
    change = schedule.next_change(when)
    if change is None:
        for hours in range(0, 24 * 8, 7):
            assert schedule.rate_at(when + timedelta(hours=hours)) == rate
        return
    assert change > when and schedule.rate_at(change) != rate
    assert schedule.rate_at(change - timedelta(seconds=1)) == rate


schedule_alphabet = string.digits + " :-+,./kKmMgGbitBpsMonTueWedThuFriSatSun\t"


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet=schedule_alphabet, max_size=60)))
def test_any_text_either_parses_or_raises_the_parsers_own_error(text: str) -> None:
    try:
        schedule = parse_schedule(text)
    except ScheduleError as exc:
        assert exc.reason and "\n" not in str(exc).replace(text, "")
        return
    assert parse_schedule(str(schedule)).entries == schedule.entries
    schedule.rate_at(MON)
    schedule.next_change(MON)


# -- status -----------------------------------------------------------------------------


def test_status_shows_the_schedule_the_rate_now_and_the_next_change() -> None:
    s = parse_schedule("2Mbit/s 08:00-20:00, 50Mbit/s")
    doc = limit_status(s, at(0, 9))
    assert doc == {
        "schedule": "2Mbit/s 08:00-20:00, 50Mbit/s",
        "rate": 2 * MBIT,
        "rate_text": "2 Mbit/s",
        "next_change": "2026-11-30T20:00",
        "next_rate": 50 * MBIT,
        "next_rate_text": "50 Mbit/s",
    }
    assert limit_status(parse_schedule("0"), at(0, 9))["rate_text"] == "no cap"
    assert format_rate(64000.0) == "512 kbit/s"


# -- throttles following the schedule -----------------------------------------------------


def test_scheduled_rate_rereads_at_the_window_edge_and_at_least_every_minute() -> None:
    limit = ScheduledRate(parse_schedule("2Mbit 08:00-20:00, 50Mbit"))
    assert limit.update(at(0, 19, 59))
    assert limit.rate == 2 * MBIT and limit.next_change == at(0, 20)
    assert not limit.update(at(0, 19, 59, 30))  # not re-read before the edge
    assert limit.update(at(0, 20))  # the edge
    assert limit.rate == 50 * MBIT
    # A wall clock set back is noticed: the window applies again.
    assert limit.update(at(0, 12))
    assert limit.rate == 2 * MBIT
    assert limit._recheck == at(0, 12, 1)  # a minute at most, though the edge is hours away


def test_wan_throttle_switches_rate_at_the_window_edge_without_a_restart() -> None:
    clock = [at(0, 19, 59, 58)]
    origin = OriginClient(
        "http://127.0.0.1:1",
        None,  # type: ignore[arg-type]  # no request is made
        parse_schedule("2Mbit 08:00-20:00, 50Mbit"),
        clock=lambda: clock[0],
    )
    assert origin.wan_rate == 2 * MBIT
    assert origin.current_rate == 2 * MBIT
    origin.set_share(2)  # two peers fetching: half each
    assert origin.current_rate == 1 * MBIT
    # One slice's worth of budget at the old rate...
    wait_before = origin.bucket.delay_for(10 * 250_000, 100.0)
    clock[0] = at(0, 20)
    origin.follow_schedule()  # what the next slice of a running download does
    assert origin.wan_rate == 50 * MBIT
    assert origin.current_rate == 25 * MBIT
    assert origin.controller.max_rate == 25 * MBIT
    # ...and the same debt now drains 25 times faster.
    assert origin.bucket.delay_for(0, 100.0) < wait_before / 20


def test_wan_throttle_with_a_no_cap_window_stops_delaying() -> None:
    clock = [at(0, 21)]
    origin = OriginClient(
        "http://127.0.0.1:1", None,  # type: ignore[arg-type]
        parse_schedule("0 20:00-06:00, 1Mbit"), clock=lambda: clock[0],
    )  # fmt: skip
    assert origin.current_rate == 0.0
    assert origin.bucket.delay_for(10**9, 1.0) == 0.0
    clock[0] = at(1, 6)
    origin.follow_schedule()
    assert origin.current_rate == 1 * MBIT
    assert origin.bucket.delay_for(10**6, 2.0) > 0


def test_lan_bucket_follows_the_schedule_with_an_injected_clock() -> None:
    bucket = ScheduledBucket(parse_schedule("1MB 08:00-20:00, 0"))
    assert bucket.rate(at(0, 7)) == 0.0
    assert bucket.delay_for(10**9, 0.0, at(0, 7)) == 0.0
    assert bucket.rate(at(0, 8)) == 1e6
    # A full bucket (0.25 s of rate) then 1 s of debt per MB.
    assert bucket.delay_for(1_250_000, 10.0, at(0, 8)) == pytest.approx(1.0)
    assert bucket.delay_for(0, 10.0, at(0, 20)) == 0.0  # 20:00: no cap again


# -- the command line and pxepeer status --------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [(["--wan-rate", "2Mbit 08:00-20:00"], "--wan-rate '2Mbit 08:00-20:00': no default rate"),
     (["--wan-rate", "fast"], "--wan-rate 'fast': 'fast' is not RATE [DAYS] [HH:MM-HH:MM]"),
     (["--lan-rate", "1MB 09:00-25:00, 0"], "--lan-rate '1MB 09:00-25:00, 0': '25:00'")],
)  # fmt: skip
def test_a_bad_rate_option_is_one_line_and_exit_2(tmp_path: Path, args, message) -> None:
    from click.testing import CliRunner

    from peer.serve import serve

    result = CliRunner().invoke(
        serve, ["--trust", str(tmp_path / "k.pub"), "--cache-dir", str(tmp_path / "c"), *args]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_pxepeer_status_shows_both_limits_and_the_next_change() -> None:
    wan = parse_schedule("2Mbit/s 08:00-20:00, 50Mbit/s")
    doc = {
        "site": {"site": "lab", "peers": []},
        "rate_limits": {
            "wan": limit_status(wan, at(0, 9)),
            "lan": limit_status(parse_schedule("0", "--lan-rate"), at(0, 9)),
        },
    }
    text = render_status(doc)
    assert (
        "WAN rate (origin downloads): 2 Mbit/s until 2026-11-30T20:00, then 50 Mbit/s"
        "  (schedule: 2Mbit/s 08:00-20:00, 50Mbit/s)"
    ) in text
    assert "LAN rate (serving): no cap\n" in text


def test_metrics_export_both_limits_in_force_now_as_one_gauge_by_direction() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from peer.api.metrics import render_metrics

    snapshot = {
        "rate_limits": {
            "wan": limit_status(parse_schedule("2Mbit/s 08:00-20:00, 50Mbit/s"), at(0, 21)),
            "lan": limit_status(parse_schedule("0", "--lan-rate"), at(0, 21)),
        }
    }
    families = {f.name: f for f in text_string_to_metric_families(render_metrics(snapshot))}
    family = families["pxepeer_rate_limit_bytes_per_second"]
    assert family.type == "gauge"
    samples = {s.labels["direction"]: s.value for s in family.samples}
    assert samples == {"wan": 50 * MBIT, "lan": 0.0}
