"""The dashboard's document (peer/api/dashboard.py), its routes and headers, and the ring
of recent warnings (peer/adapters/recent_warnings.py)."""

from __future__ import annotations

import asyncio
import logging
import re
from importlib import resources
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from peer.adapters.recent_warnings import MAX_MESSAGE, RecentWarnings
from peer.api.auth import ROUTE_NEEDS, install_api_auth, need_of
from peer.api.dashboard import (
    MAX_MACHINES,
    MAX_TEXT,
    add_dashboard_routes,
    dashboard_view,
    percent,
)
from peer.core.api_access import VIEWER, Role
from peer.core.rejections import Rejections
from peer.store.tokens import TokenStore

SELF = {
    "node_id": "aaaa", "self": True, "address": "10.0.0.2", "http_port": 8080,
    "responder": True, "can_answer_pxe": True,
    "counters": {"wan_bytes": 100, "lan_bytes_in": 0, "lan_bytes_out": 300},
}  # fmt: skip


def status(**site: object) -> dict[str, object]:
    return {"address": "10.0.0.2/24", "site": {"site": "s", "node_id": "aaaa", **site}}


# -- the document ---------------------------------------------------------------------------


def test_percent_is_clamped_and_none_without_a_total() -> None:
    assert percent(7, 10) == 70.0 and percent(1, 3) == 33.3
    assert percent(12, 10) == 100.0 and percent(-1, 10) == 0.0
    assert percent(5, 0) is None


def test_a_lying_peers_hello_is_cut_to_the_fields_and_types_the_page_renders() -> None:
    liar = {
        "node_id": "<b>" + "x" * 5000, "self": "yes", "address": ["10.0.0.9"],
        "http_port": -5, "responder": 1, "last_seen_seconds": float("nan"),
        "counters": {"wan_bytes": "9" * 30, "lan_bytes_in": float("inf"),
                     "lan_bytes_out": 2**80, "extra": 1},
        "script": "alert(1)",
    }  # fmt: skip
    doc = dashboard_view(status(peers=[SELF, liar], responders=["aaaa", {"x": 1}]))
    me, other = doc["peers"]
    assert me["responder"] is True and me["wan_bytes"] == 100
    assert set(other) == set(me)  # no field the page does not know
    assert len(other["node_id"]) == MAX_TEXT and other["node_id"].startswith("<b>")
    assert other["self"] is False and other["responder"] is False  # only True is true
    assert other["address"] is None and other["http_port"] == 0
    assert other["last_seen_seconds"] is None
    assert other["wan_bytes"] == 0 and other["lan_bytes_in"] == 0
    assert other["lan_bytes_out"] == 2**63 - 1
    assert doc["responders"] == ["aaaa", None]
    assert doc["bytes"]["site_wan"] == 100 and doc["bytes"]["site_lan_out"] == 2**63 - 1


def test_each_images_completeness_per_peer() -> None:
    image = {
        "name": "demo", "version": "1", "manifest_id": "ab" * 32, "in_catalog": True,
        "paused": True, "paused_by": "site override", "priority": 5, "wanted": True,
        "chunks": {"aaaa": [3, 4], "bbbb": [0, 4], "cccc": "lots", "dddd": [0, 0]},
    }  # fmt: skip
    [view] = dashboard_view(status(images=[image, "not an image"]))["images"][:1]
    assert view["paused"] is True and view["priority"] == 5
    assert view["paused_by"] == "site override"
    assert [(h["node_id"], h["have"], h["total"], h["percent"]) for h in view["holders"]] == [
        ("aaaa", 3, 4, 75.0), ("bbbb", 0, 4, 0.0), ("cccc", 0, 0, 100.0), ("dddd", 0, 0, 100.0),
    ]  # fmt: skip


def test_machines_join_boot_stages_and_imaging_jobs_most_recent_first() -> None:
    boots = [
        {"mac": "52:54:00:00:00:01", "ip": "10.0.0.50", "arch": "EFI_X64", "image": None,
         "stages": [{"stage": "offer", "at": 10.0, "detail": "ACK"},
                    {"stage": "script", "at": 11.0, "detail": "imager"}]},
        {"mac": "52:54:00:00:00:02", "ip": None, "stages": [{"stage": "tftp", "at": 50.0}]},
    ]  # fmt: skip
    jobs = [
        {"mac": "52:54:00:00:00:01", "ip": "10.0.0.50", "image": "demo 1", "state": "writing",
         "chunks_done": 7, "chunks_total": 10, "bytes_done": 1, "size": 2, "message": "7/10",
         "updated": 100.0},
        {"mac": "52:54:00:00:00:03", "state": "done", "updated": 20.0},
        {"mac": "52:54:00:00:00:04", "state": "writing", "bytes_done": 1, "size": 4,
         "updated": 5.0},
        {"state": "writing"},  # no MAC: not a machine
    ]  # fmt: skip
    machines = dashboard_view({"machines": boots, "imaging": jobs})["machines"]
    assert [m["mac"][-2:] for m in machines] == ["01", "02", "03", "04"]
    first = machines[0]
    assert first["state"] == "writing" and first["percent"] == 70.0
    assert first["arch"] == "EFI_X64" and first["last_stage"] == "script"
    assert [s["stage"] for s in first["stages"]] == ["offer", "script"]
    assert machines[1]["state"] is None and machines[1]["percent"] is None  # booting only
    assert machines[2]["percent"] == 100.0  # done, however little it said
    assert machines[3]["percent"] == 25.0  # bytes when chunks are not known


def test_the_document_is_bounded_however_many_machines_and_stages() -> None:
    stages = [{"stage": "tftp", "at": float(i), "detail": "d" * 10_000} for i in range(1000)]
    boots = [{"mac": f"m{i}", "stages": stages} for i in range(MAX_MACHINES + 50)]
    machines = dashboard_view({"machines": boots})["machines"]
    assert len(machines) == MAX_MACHINES
    assert all(len(m["stages"]) == 12 for m in machines)
    assert all(len(s["detail"]) == MAX_TEXT for s in machines[0]["stages"])


def test_current_and_recent_warnings_newest_first() -> None:
    recent = [{"at": float(i), "level": "WARNING", "logger": "pxepeer.x", "message": f"w{i}"}
              for i in range(80)]  # fmt: skip
    doc = dashboard_view({**status(warnings=["no catalog", 7]), "recent_warnings": recent})
    assert doc["warnings"]["current"] == ["no catalog", "7"]
    assert [r["message"] for r in doc["warnings"]["recent"][:2]] == ["w79", "w78"]
    assert len(doc["warnings"]["recent"]) == 50


def test_an_empty_or_broken_status_still_makes_a_document() -> None:
    for broken in ({}, {"site": "x", "machines": 3, "imaging": None, "recent_warnings": {}}):
        doc = dashboard_view(broken)
        assert doc["peers"] == [] and doc["machines"] == [] and doc["images"] == []


# -- the page -----------------------------------------------------------------------------


def test_the_page_loads_nothing_from_elsewhere_and_puts_no_data_in_markup() -> None:
    data = resources.files("peer.data")
    page = data.joinpath("dashboard.html").read_text()
    script = data.joinpath("dashboard.js").read_text()
    style = data.joinpath("dashboard.css").read_text()
    for text in (page, script, style):
        assert not re.search(r"https?:|//[a-z]|@import|url\(", text, re.I)
    # No inline script or style (the policy would refuse them), no markup from strings.
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/dashboard.js" defer>']
    assert "style=" not in page and "<style" not in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute(\"on", "createContextualFragment"):  # fmt: skip
        assert sink not in script, sink


def _client(tmp_path: Path, doc: dict[str, object], open_loopback: bool = True) -> TestClient:
    app = web.Application()
    add_dashboard_routes(app, lambda: doc)
    install_api_auth(app, TokenStore(tmp_path), Rejections(), open_loopback)
    return TestClient(TestServer(app))


def test_dashboard_routes_need_a_viewer_like_status() -> None:
    app = web.Application()
    add_dashboard_routes(app, dict)
    for route in app.router.routes():
        canonical = route.resource.canonical  # type: ignore[union-attr]
        assert canonical in ROUTE_NEEDS, canonical
        assert need_of(canonical, route.method) == VIEWER == need_of("/v1/status", "GET")


def test_every_response_carries_a_policy_that_allows_only_the_peer_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _client(tmp_path, status(peers=[SELF])) as client:
            for path, kind in (("/", "text/html"), ("/dashboard.js", "text/javascript"),
                               ("/dashboard.css", "text/css"),
                               ("/v1/dashboard", "application/json")):  # fmt: skip
                response = await client.get(path)
                assert response.status == 200 and response.content_type == kind, path
                policy = response.headers["Content-Security-Policy"]
                assert policy.startswith("default-src 'none';")
                assert "script-src 'self';" in policy and "connect-src 'self';" in policy
                assert "require-trusted-types-for 'script'" in policy
                assert response.headers["X-Content-Type-Options"] == "nosniff"
            doc = await (await client.get("/v1/dashboard")).json()
            assert doc["peers"][0]["node_id"] == "aaaa"

    asyncio.run(scenario())


def test_an_unchanged_document_is_a_304(tmp_path: Path) -> None:
    doc = status(peers=[SELF])

    async def scenario() -> None:
        async with _client(tmp_path, doc) as client:
            first = await client.get("/v1/dashboard")
            etag = first.headers["ETag"]
            again = await client.get("/v1/dashboard", headers={"If-None-Match": etag})
            assert again.status == 304 and await again.read() == b""
            doc["site"]["node_id"] = "bbbb"  # type: ignore[index]
            changed = await client.get("/v1/dashboard", headers={"If-None-Match": etag})
            assert changed.status == 200 and changed.headers["ETag"] != etag

    asyncio.run(scenario())


def test_with_tokens_the_page_and_its_data_ask_the_browser_for_one(tmp_path: Path) -> None:
    TokenStore(tmp_path).create(Role.VIEWER, "v")

    async def scenario() -> None:
        async with _client(tmp_path, status(), open_loopback=False) as client:
            for path in ("/", "/dashboard.js", "/v1/dashboard"):
                response = await client.get(path)
                assert response.status == 401, path
                assert any(
                    c.startswith("Basic ") for c in response.headers.getall("WWW-Authenticate")
                )
        async with _client(tmp_path, status(), open_loopback=True) as client:
            assert (await client.get("/")).status == 200  # loopback, open by default

    asyncio.run(scenario())


# -- recent warnings ----------------------------------------------------------------------


def test_recent_warnings_keep_the_last_records_at_warning_and_above() -> None:
    logger = logging.getLogger("test_dashboard.ring")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    ring = RecentWarnings(capacity=3).install(logger)
    try:
        logger.info("not kept")
        for i in range(5):
            logger.warning("warning %d", i)
        logger.error("two\nlines %s", "x" * 2 * MAX_MESSAGE)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
        logger.warning("bad format %d", "not a number")
    finally:
        ring.uninstall()
    logger.warning("after uninstall")
    records = ring.snapshot()
    assert [r["level"] for r in records] == ["ERROR", "ERROR", "WARNING"]
    assert records[0]["message"].startswith("two lines xxx") and "\n" not in records[0]["message"]
    assert len(records[0]["message"]) == MAX_MESSAGE
    assert records[1]["message"] == "it failed (ValueError: boom)"
    assert records[2]["message"] == "bad format %d"  # the template, not a traceback
    assert all(r["logger"] == "test_dashboard.ring" for r in records)
    assert isinstance(records[0]["at"], float)


def test_recent_warnings_hear_every_module_through_the_root_logger() -> None:
    ring = RecentWarnings().install()
    try:
        logging.getLogger("pxepeer.somewhere").warning("heard")
    finally:
        ring.uninstall()
    assert [r["message"] for r in ring.snapshot()] == ["heard"]
    assert ring not in logging.getLogger().handlers
