"""The HTTP endpoints peers use with each other (beside the chunk endpoint every client
uses): heartbeat hellos, have-notices, and the signed catalog and manifests, so a peer
cut off from the origin can still learn both from its site.

Have-notices are read up to MAX_HAVE_BYTES and no further, parsed as hostile
(peer/core/wire.py) and checked against our own manifests by the site core; a refused
notice is answered 400 and counted by reason, and never touches anything else.
"""

from __future__ import annotations

import logging

from aiohttp import web

from peer.adapters.site import Site
from peer.api.http_guard import read_body
from peer.core.wire import MAX_HAVE_BYTES, WireError, parse_have

log = logging.getLogger("pxepeer.peer_api")

SITE = web.AppKey("site", Site)


async def hello(request: web.Request) -> web.Response:
    site = request.app[SITE]
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    address = sockname[0] if sockname else ""
    return web.json_response(site.hello(address).to_json())


async def have(request: web.Request) -> web.Response:
    site = request.app[SITE]
    try:
        body = await read_body(request, MAX_HAVE_BYTES, timeout=5.0)
    except web.HTTPException:
        site.rejections.count("have", "oversize or slow")
        raise
    try:
        notice = parse_have(body)
        site.have_received(notice)
    except WireError as exc:
        site.rejections.count_error("have", exc)
        raise web.HTTPBadRequest(text=f"bad have-notice: {exc}\n") from None
    return web.Response(status=204)


async def catalog(request: web.Request) -> web.Response:
    data = request.app[SITE].catalog_bytes
    if data is None:
        raise web.HTTPNotFound(text="no catalog held\n")
    return web.Response(body=data, content_type="application/json")


async def manifest(request: web.Request) -> web.StreamResponse:
    site = request.app[SITE]
    manifest_id = request.match_info["manifest_id"]
    if manifest_id not in site.images:
        raise web.HTTPNotFound()
    path = site.store.manifest_path(manifest_id)
    return web.FileResponse(path, headers={"Content-Type": "application/json"})


def add_peer_routes(app: web.Application, site: Site) -> None:
    app[SITE] = site
    app.router.add_get("/v1/peer", hello)
    app.router.add_post("/v1/have", have)
    app.router.add_get("/v1/catalog", catalog)
    app.router.add_get("/v1/manifests/{manifest_id:[0-9a-f]{64}}", manifest)
