"""The dashboard: a page at `/` that shows an admin the site as this peer sees it.

    GET /                the page (peer/data/dashboard.html)
    GET /dashboard.js    its script, GET /dashboard.css its style (peer/data/)
    GET /v1/dashboard    the document the page renders: `dashboard_view(status)`

Everything the page needs comes from the peer itself: no CDN, no web font, no inline
script or style, and a Content-Security-Policy that allows nothing else (`default-src
'none'`, then 'self' for script, style, fetch and images). A store may have no internet,
and a page that loads nothing from elsewhere leaks nothing elsewhere either. The policy
also sets `require-trusted-types-for 'script'` with no policy allowed: Chromium then
throws on any string assigned to innerHTML, so the page *cannot* parse data as markup
even by a later mistake. The data is hostile by assumption: node ids, addresses and
counters come from other peers' hellos, image titles, disk paths and messages from
imaging reports anyone on the LAN may post, warnings quote both. The page puts every
value in the DOM with textContent, createElement and element properties only.

Live updates: polling, not server-sent events. The page asks for /v1/dashboard every
2 s, the next request only once the last one has finished (so a slow peer or a slow
link never has requests piling up), and not at all while the tab is hidden. Why not SSE:
- nothing to bound: a poll is an ordinary short request under the HTTP guard's caps
  and deadlines (peer/api/http_guard.py), where an event stream is a connection held
  open for minutes that would need its own cap, heartbeat, lifetime and a rule for what
  to do when a slow reader stops draining (a queue per client, or dropping events);
- the cost is the same: the document is built from `status()`, which is cheap and
  built on demand; a stream would rebuild it on a timer for every listener anyway,
  since the site has no single "something changed" event to push from;
- 2 s is live for people watching a machine image itself (the agent reports every
  2 s), and an unchanged document costs a 304: the response carries an ETag of its
  body and the browser revalidates with If-None-Match;
- a browser that lost its peer just tries again (backing off to 15 s), with no
  EventSource reconnection and Last-Event-ID semantics to get right.

Access is the status page's: viewer role, or loopback when open (peer/api/auth.py
ROUTE_NEEDS); the Basic challenge on a 401 makes the browser ask for the token.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources

from aiohttp import web

PAGE = "dashboard.html"
SCRIPT = "dashboard.js"
STYLE = "dashboard.css"
DASHBOARD_PATH = "/v1/dashboard"
# What this page may load and do: its own script, style and JSON; no frames, no forms,
# no plugins, no markup from strings (Trusted Types with no policy).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

# Bounds on what one document carries, whatever the status holds: a page an admin
# leaves open must stay small to fetch every 2 s and quick to render.
MAX_TEXT = 300
MAX_PEERS = 256
MAX_IMAGES = 128
MAX_MACHINES = 200
MAX_STAGES = 12
MAX_CURRENT_WARNINGS = 50
MAX_RECENT_WARNINGS = 50
MAX_COUNT = 2**63 - 1


def _text(value: object, limit: int = MAX_TEXT) -> str | None:
    """A string for the page, cut to `limit`; None for anything that is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _count(value: object) -> int:
    """A non-negative integer, 0 for anything else (a lying peer's counters included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(0, min(int(value), MAX_COUNT))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def percent(done: int, total: int) -> float | None:
    """done/total as a percentage, one decimal, within 0..100; None when total is 0."""
    if total <= 0:
        return None
    return round(min(100.0, max(0.0, 100.0 * done / total)), 1)


def _peer(raw: Mapping[str, object]) -> dict[str, object]:
    counters = _dict(raw.get("counters"))
    return {
        "node_id": _text(raw.get("node_id")),
        "self": raw.get("self") is True,
        "address": _text(raw.get("address")),
        "http_port": _count(raw.get("http_port")),
        "responder": raw.get("responder") is True,
        "can_answer_pxe": raw.get("can_answer_pxe") is True,
        "last_seen_seconds": _number(raw.get("last_seen_seconds")),
        "wan_bytes": _count(counters.get("wan_bytes")),
        "lan_bytes_in": _count(counters.get("lan_bytes_in")),
        "lan_bytes_out": _count(counters.get("lan_bytes_out")),
    }


def _image(raw: Mapping[str, object]) -> dict[str, object]:
    holders = []
    for node, counts in list(_dict(raw.get("chunks")).items())[:MAX_PEERS]:
        pair = _list(counts)
        have, total = (_count(pair[0]), _count(pair[1])) if len(pair) == 2 else (0, 0)
        holders.append(
            {"node_id": _text(node), "have": have, "total": total,
             "percent": percent(have, total) if total else 100.0}
        )  # fmt: skip
    return {
        "name": _text(raw.get("name")),
        "version": _text(raw.get("version")),
        "manifest_id": _text(raw.get("manifest_id"), 64),
        "in_catalog": raw.get("in_catalog") is True,
        "paused": raw.get("paused") is True,
        # catalog, "control serial N" or "site override": who paused it, in a word.
        "paused_by": _text(raw.get("paused_by"), 40) or None,
        "priority": _count(raw.get("priority")) or None,
        "wanted": raw.get("wanted") is True,
        "holders": holders,
    }


def _stages(raw: object) -> list[dict[str, object]]:
    stages = []
    for stage in _list(raw)[-MAX_STAGES:]:
        stage = _dict(stage)
        stages.append(
            {"stage": _text(stage.get("stage"), 40), "at": _number(stage.get("at")),
             "detail": _text(stage.get("detail"))}
        )  # fmt: skip
    return stages


def _machine(mac: str, boot: Mapping[str, object], job: Mapping[str, object]) -> dict[str, object]:
    """One machine: its boot stages (peer/core/boot_progress.py) and its imaging job
    (peer/api/imaging_api.py), either of which may be missing."""
    stages = _stages(boot.get("stages"))
    done, total = _count(job.get("chunks_done")), _count(job.get("chunks_total"))
    done_bytes, size = _count(job.get("bytes_done")), _count(job.get("size"))
    state = _text(job.get("state"), 40)
    progress = percent(done, total) if total else percent(done_bytes, size)
    if progress is None and state == "done":
        progress = 100.0
    last_at = stages[-1]["at"] if stages else None
    updated = max(
        (t for t in (_number(job.get("updated")), last_at) if isinstance(t, float)), default=0.0
    )
    return {
        "mac": _text(mac, 40),
        "ip": _text(job.get("ip")) or _text(boot.get("ip")),
        "arch": _text(boot.get("arch"), 40),
        "image": _text(job.get("image")) or _text(boot.get("image")),
        "state": state,
        "chunks_done": done,
        "chunks_total": total,
        "bytes_done": done_bytes,
        "size": size,
        "percent": progress,
        "message": _text(job.get("message")),
        "last_stage": stages[-1]["stage"] if stages else None,
        "stages": stages,
        "updated": updated,
    }


def _machines(status: Mapping[str, object]) -> list[dict[str, object]]:
    boots = {m["mac"]: m for m in map(_dict, _list(status.get("machines")))
             if isinstance(m.get("mac"), str)}  # fmt: skip
    jobs = {j["mac"]: j for j in map(_dict, _list(status.get("imaging")))
            if isinstance(j.get("mac"), str)}  # fmt: skip
    machines = [_machine(mac, boots.get(mac, {}), jobs.get(mac, {})) for mac in {**boots, **jobs}]
    # Most recently active first: the machine being imaged now is at the top.
    machines.sort(key=lambda m: (-float(m["updated"]), str(m["mac"])))
    return machines[:MAX_MACHINES]


def _recent(raw: object) -> list[dict[str, object]]:
    recent = []
    for record in _list(raw)[-MAX_RECENT_WARNINGS:]:
        record = _dict(record)
        recent.append(
            {"at": _number(record.get("at")), "level": _text(record.get("level"), 20),
             "logger": _text(record.get("logger"), 80), "message": _text(record.get("message"))}
        )  # fmt: skip
    recent.reverse()  # newest first
    return recent


def _total(peers: list[dict[str, object]], key: str) -> int:
    return min(MAX_COUNT, sum(_count(p[key]) for p in peers))


def dashboard_view(status: Mapping[str, object]) -> dict[str, object]:
    """What the page shows, from the daemon's status document: only the fields it
    renders, each checked for its type and cut to size (a peer's hello is not trusted
    to hold what it should)."""
    site = _dict(status.get("site"))
    peers = [_peer(_dict(p)) for p in _list(site.get("peers"))[:MAX_PEERS]]
    catalog = _dict(site.get("catalog"))
    membership = _dict(site.get("membership"))
    return {
        "site": _text(site.get("site")),
        "node_id": _text(site.get("node_id")),
        "address": _text(status.get("address")),
        "responders": [_text(r) for r in _list(site.get("responders"))[:MAX_PEERS]],
        "this_peer_responds": site.get("this_peer_responds") is True,
        "membership": _text(membership.get("mode")) or ("enrolled" if membership else None),
        "catalog": (
            {"serial": _count(catalog.get("serial")), "expired": catalog.get("expired") is True}
            if catalog
            else None
        ),
        "peers": peers,
        # WAN against LAN: what this peer counted itself, and the site's totals as its
        # peers report them (their own counters, in their hellos).
        "bytes": {
            "wan": _count(site.get("wan_bytes")),
            "lan_in": _count(site.get("lan_bytes_in")),
            "site_wan": _total(peers, "wan_bytes"),
            "site_lan_in": _total(peers, "lan_bytes_in"),
            "site_lan_out": _total(peers, "lan_bytes_out"),
        },
        "images": [_image(_dict(i)) for i in _list(site.get("images"))[:MAX_IMAGES]],
        "machines": _machines(status),
        "warnings": {
            "current": [_text(w) for w in _list(site.get("warnings"))[:MAX_CURRENT_WARNINGS]],
            "recent": _recent(status.get("recent_warnings")),
        },
    }


def _asset(name: str) -> bytes:
    return resources.files("peer.data").joinpath(name).read_bytes()


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _response(request: web.Request, body: bytes, content_type: str) -> web.Response:
    """`body` with the security headers, or a 304 when the browser holds it already.
    no-cache: revalidated on every use, so an open page sees a changed document (and a
    peer upgraded under it serves its new script)."""
    etag = _etag(body)
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)


def _static(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return _response(request, body, content_type)

    return handler


def add_dashboard_routes(app: web.Application, status: Callable[[], Mapping[str, object]]) -> None:
    """Register the page, its assets and its document; `status` is the daemon's status()
    (called per request: the document is as fresh as `pxepeer status`)."""

    async def document(request: web.Request) -> web.Response:
        view = dashboard_view(status())
        body = json.dumps(view, separators=(",", ":"), default=str).encode()
        return _response(request, body, "application/json")

    app.router.add_get("/", _static(_asset(PAGE), "text/html"))
    app.router.add_get("/" + SCRIPT, _static(_asset(SCRIPT), "text/javascript"))
    app.router.add_get("/" + STYLE, _static(_asset(STYLE), "text/css"))
    app.router.add_get(DASHBOARD_PATH, document)
