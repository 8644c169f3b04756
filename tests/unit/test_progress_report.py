"""The imaging agent's progress reports: strict parsing, and what a report may change.

Reports come from anyone on the LAN; one whose `corrupt=` count was huge once froze the
daemon. These tests feed `parse_report` the agent's real body and hostile ones, and an
`ImagingApi` (over a stand-in for the site) reports that try to move a job where it
cannot go or to strike a peer many times at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imaging.plan import Plan, PlanChunk
from imaging.progress_report import (
    MAX_BODY,
    MAX_COUNT,
    MAX_PEERS,
    ProgressReport,
    ReportError,
    parse_report,
)
from peer.api.imaging_api import (
    MAX_CORRUPT_COUNTED,
    REPORT_INPUT,
    ImagingApi,
    ReportRefused,
    add_imaging_routes,
    report_allowed,
)
from peer.core.boot_progress import BootProgress
from peer.core.rejections import Rejections
from peer.core.reputation import Reputation
from peer.store.content_store import ContentStore

MANIFEST = "ab" * 32
MAC = "52:54:00:77:0b:01"
PEER_B = "http://10.0.0.3:8080"

# What pxepeer-agent.sh's report() posts (busybox wget --post-data, no final newline).
AGENT_BODY = (
    f"state=writing\nmanifest={MANIFEST}\nimage=demo-disk 1\ndisk=/dev/vda\ntotal=10\n"
    "done=4\nbytes=16777216\nsize=41943040\nfetched=8388608\n"
    "peers=http://10.0.0.2:8080=3,http://10.0.0.3:8080=1\ncorrupt=http://10.0.0.3:8080=1\n"
    "message=4/10 chunks; last problem: chunk 3 peer http://10.0.0.3:8080: corrupt chunk"
).encode()


def body(**fields: str) -> bytes:
    return "\n".join(f"{k}={v}" for k, v in {"state": "writing", **fields}.items()).encode()


def refusal(data: bytes) -> str:
    with pytest.raises(ReportError) as caught:
        parse_report(data)
    return caught.value.reason


# -- parse_report ----------------------------------------------------------------------


def test_the_agents_report_parses_whole() -> None:
    report = parse_report(AGENT_BODY)
    assert report.state == "writing" and report.manifest == MANIFEST
    assert report.image == "demo-disk 1" and report.disk == "/dev/vda"
    assert (report.total, report.done, report.bytes, report.size, report.fetched) == (
        10, 4, 16777216, 41943040, 8388608,
    )  # fmt: skip
    assert report.peers_used() == {"http://10.0.0.2:8080": 3, PEER_B: 1}
    assert report.corrupt_from() == {PEER_B: 1}
    assert report.message is not None and report.message.startswith("4/10 chunks")


def test_empty_values_mean_not_reported_and_crlf_lines_are_accepted() -> None:
    report = parse_report(b"state=planning\r\nmanifest=\r\npeers=\r\ncorrupt=\r\ntotal=\r\n\r\n")
    assert report == ProgressReport(state="planning")
    assert parse_report(b"state=failed\nmessage=").message == ""  # an empty message clears


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"state=writing\n" + b"x" * MAX_BODY, "too_big"),
        (b"state=writing" + b"\n" * 64 + b"x", "too_many_lines"),  # 65 lines
        (b"state=writing\nmessage=\xff\xfe", "invalid_utf8"),
        (b"state=writing\nmessage=\xed\xa0\x80", "invalid_utf8"),  # a lone surrogate
        (b"state=writing\njust words", "not_key_value"),
        (b"state=writing\nowner=me", "unknown_key"),
        (b"state=writing\nstate=done", "duplicate_key"),
        (b"total=3", "no_state"),
        (b"state=rebooting", "unknown_state"),
        (body(manifest="ab" * 31), "bad_manifest"),
        (body(total="12a"), "bad_number"),
        (body(total="-1"), "bad_number"),
        (body(total="\u00b2"), "bad_number"),  # str.isdigit() says yes
        (body(total="1" + "0" * 16), "bad_number"),  # 17 digits: refused before int()
        (body(total=str(2**53 + 1)), "number_too_big"),
        (body(message="m" * 301), "value_too_long"),
        (body(disk="/dev/" + "d" * 300), "value_too_long"),
        (body(message="\x1b]0;owned\x07"), "control_character"),
        (body(image="demo\u2028shell"), "control_character"),
        (
            body(corrupt=",".join(f"http://10.0.0.{i}:80=1" for i in range(MAX_PEERS + 1))),
            "too_many_peers",
        ),
        (body(peers="http://" + "h" * 200 + ":80=1"), "peer_url_too_long"),
        (body(corrupt="ftp://10.0.0.3:21=1"), "bad_peer_url"),
        (body(corrupt="http://10.0.0.3:99999=1"), "bad_peer_url"),
        (body(corrupt="http://10.0.0.3:8080/x=1"), "bad_peer_url"),
        (body(corrupt="http://a b:80=1"), "bad_peer_url"),
        (body(corrupt=f"{PEER_B}=1,{PEER_B}=2"), "duplicate_peer"),
        (body(corrupt=f"{PEER_B}"), "bad_peer_entry"),
        (body(corrupt=f"{PEER_B}="), "bad_peer_entry"),
        (body(corrupt=f"{PEER_B}=1e9"), "bad_number"),
    ],
)
def test_hostile_reports_are_refused_with_a_fixed_reason(data: bytes, reason: str) -> None:
    assert refusal(data) == reason


def test_a_huge_corrupt_count_is_clamped_not_looped_over() -> None:
    report = parse_report(body(corrupt=f"{PEER_B}=99999999999"))
    assert report.corrupt_from() == {PEER_B: MAX_COUNT}


def test_peer_urls_may_name_ipv6_hosts_and_omit_port_80() -> None:
    report = parse_report(body(peers="http://[fd00::2]:8080=2,http://10.0.0.9=1"))
    assert report.peers_used() == {"http://[fd00::2]:8080": 2, "http://10.0.0.9": 1}


def test_any_bytes_give_a_report_or_a_report_error_and_nothing_else() -> None:
    # A cheap deterministic sweep (the hypothesis fuzzing lives with the other parsers):
    # every prefix and every single-byte corruption of the agent's real report.
    for cut in range(len(AGENT_BODY) + 1):
        for data in (AGENT_BODY[:cut], AGENT_BODY[:cut] + b"\x80" + AGENT_BODY[cut + 1 :]):
            try:
                parse_report(data)
            except ReportError:
                pass


# -- what a report may do to a job -----------------------------------------------------


class FakeSite:
    """The part of the site the imaging API touches: peers by endpoint, reputation."""

    def __init__(self) -> None:
        self.images: dict[str, Any] = {}
        self.membership = SimpleNamespace(live=lambda now: [])
        self.endpoint_of = {"node-b": "10.0.0.3:8080", "node-c": "10.0.0.4:8080"}
        self.reputation = Reputation(limit=1000)
        self.counters = SimpleNamespace(bad_chunks_received=0)
        self.node_id = "00000000000000aa"
        self.recorded: list[Any] = []

    def machine(self, mac: str) -> Any:
        return SimpleNamespace(assigned=None, generation=0, imaged=None,
                               imaged_for_assignment=False)  # fmt: skip

    async def add_records(self, records: list[Any]) -> list[Any]:
        self.recorded.extend(records)
        return records


def make_api() -> tuple[ImagingApi, FakeSite]:
    site = FakeSite()
    api = ImagingApi(cast(Any, site), cast(Any, None), cast(Any, None), BootProgress())
    return api, site


PLAN = Plan(
    manifest_id=MANIFEST, name="demo-disk", version="1", disk_size=8 << 20,
    disk_sha256="cd" * 32, chunk_size=4 << 20, peers=(PEER_B, "http://10.0.0.4:8080"),
    chunks=(PlanChunk(0, 4 << 20, "ef" * 32, False, (0, 1)),
            PlanChunk(4 << 20, 4 << 20, "00" * 32, True)),
)  # fmt: skip


def apply(api: ImagingApi, state: str, **fields: str) -> None:
    """A report of `state`; the pseudo-state "PLAN" is the agent's plan request."""
    if state == "PLAN":
        api.plan_made(MAC, PLAN, "10.0.0.50")
    else:
        api.apply_report(MAC, parse_report(body(state=state, **fields)), "10.0.0.50")


def job_state(api: ImagingApi) -> str | None:
    return api._jobs[MAC].state if MAC in api._jobs else None


def test_a_huge_corrupt_count_costs_the_peer_one_strike_and_a_capped_count() -> None:
    api, site = make_api()
    apply(api, "PLAN")
    apply(api, "writing", total="10", corrupt=f"{PEER_B}=99999999999,http://10.0.0.4:8080=2")
    assert site.reputation.total_strikes == {"node-b": 1, "node-c": 1}
    assert site.counters.bad_chunks_received == 10 + 2  # at most the image's chunk count
    # The agent's counts are running totals: the same report again is nothing new.
    apply(api, "writing", total="10", corrupt=f"{PEER_B}=99999999999")
    assert site.reputation.total_strikes == {"node-b": 1, "node-c": 1}


def test_corrupt_chunks_counted_per_report_are_capped_whatever_total_is_claimed() -> None:
    api, site = make_api()
    apply(api, "PLAN")
    apply(api, "writing", total=str(2**53), corrupt=f"{PEER_B}=5000000")
    assert site.counters.bad_chunks_received == MAX_CORRUPT_COUNTED
    assert site.reputation.total_strikes == {"node-b": 1}


def test_corrupt_chunks_from_a_peer_the_plan_did_not_name_strike_nobody() -> None:
    api, site = make_api()
    apply(api, "PLAN")
    # node-c is a known peer, but this job's plan never sent the agent to it.
    apply(api, "writing", corrupt="http://10.9.9.9:8080=3,http://10.0.0.5:8080=2")
    assert site.reputation.total_strikes == {} and site.counters.bad_chunks_received == 0
    assert api._jobs[MAC].corrupt_from == {}


def test_corrupt_reports_after_the_run_ended_strike_nobody() -> None:
    api, site = make_api()
    apply(api, "PLAN")
    for state in ("writing", "verifying", "done"):
        apply(api, state, manifest=MANIFEST)
    apply(api, "done", corrupt=f"{PEER_B}=5")
    assert site.reputation.total_strikes == {}


def test_a_job_remembers_a_bounded_number_of_corrupt_sources() -> None:
    api, _ = make_api()
    urls = [f"http://10.1.{batch}.{i}:80" for batch in range(3) for i in range(MAX_PEERS)]
    api.plan_made(MAC, replace(PLAN, peers=tuple(urls)), "10.0.0.50")
    for batch in range(3):
        apply(api, "writing", corrupt=",".join(f"{u}=1" for u in urls[batch::3]))
    assert len(api._jobs[MAC].corrupt_from) == MAX_PEERS


def test_a_whole_run_moves_the_job_through_every_state() -> None:
    api, _ = make_api()
    for state in ("planning", "PLAN", "writing", "writing", "verifying", "done"):
        apply(api, state, manifest=MANIFEST)
        assert job_state(api) == ("planned" if state == "PLAN" else state)
    apply(api, "planning")  # the machine is imaged again later
    assert job_state(api) == "planning"


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ((), "done"),  # done out of nowhere would make the machine boot its disk
        ((), "verifying"),
        (("planning",), "writing"),  # writing needs a plan first
        (("planning",), "done"),
        (("planning", "PLAN"), "done"),
        (("planning", "PLAN", "writing"), "done"),  # never verified
        (("planning", "PLAN", "writing", "verifying", "done"), "failed"),  # finished is final
        (("planning", "PLAN", "writing"), "planned"),  # only a plan made here enters it
    ],
)
def test_reports_outside_the_transitions_table_are_refused(
    path: tuple[str, ...], refused: str
) -> None:
    api, _ = make_api()
    for state in path:
        apply(api, state)
    with pytest.raises(ReportRefused) as caught:
        apply(api, refused, message="forged")
    assert caught.value.reason == "transition"
    before = {"PLAN": "planned"}.get(path[-1], path[-1]) if path else None
    assert job_state(api) == before  # untouched, or never created
    if path:
        assert api._jobs[MAC].message != "forged"


def test_a_report_for_another_image_mid_run_is_refused() -> None:
    api, _ = make_api()
    apply(api, "PLAN")
    apply(api, "writing", manifest=MANIFEST)
    with pytest.raises(ReportRefused) as caught:
        apply(api, "writing", manifest="cd" * 32)
    assert caught.value.reason == "manifest_mismatch"
    apply(api, "planning", manifest="cd" * 32)  # a new run may be for another image
    assert api._jobs[MAC].manifest_id == "cd" * 32


def test_every_state_can_start_a_new_run_and_no_report_enters_planned() -> None:
    for current in (None, "planned", "starting", "planning", "writing", "verifying", "done",
                    "failed"):  # fmt: skip
        assert report_allowed(current, "planning") and report_allowed(current, "starting")
        assert not report_allowed(current, "planned")


def test_refused_reports_are_answered_and_counted_by_reason_over_http(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], dict[str, dict[str, int]], float]:
        rejections = Rejections()
        app = web.Application()
        api = add_imaging_routes(
            app, cast(Any, FakeSite()), cast(Any, None), ContentStore(tmp_path / "c"),
            BootProgress(), rejections,
        )  # fmt: skip
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            statuses = []
            started = time.monotonic()
            for query, data in [
                (f"mac={MAC}", body(corrupt=f"{PEER_B}=99999999999")),
                (f"mac={MAC}", b"state=done"),
                (f"mac={MAC}", b"state=writing\nmessage=\xff"),
                (f"mac={MAC}", b"state=writing\n" + b"x" * (MAX_BODY + 10)),
                ("mac=nope", b"state=writing"),
            ]:
                async with client.post(f"/v1/imaging/progress?{query}", data=data) as resp:
                    statuses.append(resp.status)
            elapsed = time.monotonic() - started
        assert MAC not in api._jobs
        return statuses, rejections.snapshot(), elapsed

    statuses, counted, elapsed = asyncio.run(run())
    # No job was started (no POST for a plan): no report without its secret counts.
    assert statuses == [403, 403, 400, 413, 400]
    assert counted == {
        REPORT_INPUT: {"no_job": 2, "invalid_utf8": 1, "too_big": 1, "bad_mac": 1}
    }
    assert elapsed < 5
