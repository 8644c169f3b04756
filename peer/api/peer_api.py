"""The HTTP endpoints peers use with each other (beside the chunk endpoint every client
uses): heartbeat hellos, have-notices, and the signed catalog and manifests, so a peer
cut off from the origin can still learn both from its site.

Only enrolled peers speak this protocol (peer/core/peer_auth.py): a hello is answered
only to a request signed by an enrolled node, and the answer is signed over that
request's nonce; a have-notice must be signed, fresh, never seen before, meant for this
peer, and name the node that signed it. Any GET that carries a peer signature (chunks,
manifests, catalog) has it checked too; one without is a booting machine's, served the
read-only, content-verified data it asks for. A peer with no enroll key trusted is a
site of one and answers none of the peer-only endpoints.

Have-notices are read up to MAX_HAVE_BYTES and no further, parsed as hostile
(peer/core/wire.py) and checked against our own manifests by the site core; a refused
notice is answered 400 (403 when unauthenticated) and counted by reason, and never
touches anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from peer.adapters.peer_credentials import PeerCredentials
from peer.adapters.site import Site
from peer.api.http_guard import read_body
from peer.core.peer_auth import AUTH_HEADER, Authenticated, AuthError
from peer.core.wire import MAX_HAVE_BYTES, WireError, parse_have

log = logging.getLogger("pxepeer.peer_api")

SITE = web.AppKey("site", Site)
PEER = "pxepeer_peer"  # request key: the authenticated node of a signed request


def _credentials(request: web.Request) -> PeerCredentials:
    credentials = request.app[SITE].credentials
    if credentials is None:
        raise web.HTTPNotFound(text="this peer is a site of one: no enroll key is trusted\n")
    return credentials


def authenticate(request: web.Request, body: bytes, changes_state: bool) -> Authenticated:
    """The enrolled node that signed this request, or 403 (counted by reason)."""
    credentials = _credentials(request)
    try:
        return credentials.check_request(
            request.headers, request.method, request.path_qs, body, changes_state
        )
    except AuthError as exc:
        raise web.HTTPForbidden(text=f"peer request refused: {exc.reason}\n") from None


@web.middleware
async def signed_reads(request: web.Request, handler):
    """A GET that carries a peer signature is checked before it is served: a peer that
    signs badly is refused, not silently treated as a booting machine."""
    if AUTH_HEADER in request.headers and request.method in ("GET", "HEAD"):
        request[PEER] = authenticate(request, b"", changes_state=False)
    return await handler(request)


async def hello(request: web.Request) -> web.Response:
    site = request.app[SITE]
    peer = request.get(PEER) or authenticate(request, b"", changes_state=False)
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    address = sockname[0] if sockname else ""
    body = json.dumps(site.hello(address).to_json()).encode()
    headers = _credentials(request).response_headers(peer, 200, body)
    return web.Response(body=body, content_type="application/json", headers=headers)


async def have(request: web.Request) -> web.Response:
    site = request.app[SITE]
    _credentials(request)
    try:
        body = await read_body(request, MAX_HAVE_BYTES, timeout=5.0)
    except web.HTTPException:
        site.rejections.count("have", "oversize or slow")
        raise
    peer = authenticate(request, body, changes_state=True)
    try:
        notice = parse_have(body)
        if notice.node_id != peer.node_id:
            raise WireError("node id mismatch", "a notice about another node")
        site.have_received(notice)
    except WireError as exc:
        site.rejections.count_error("have", exc)
        raise web.HTTPBadRequest(text=f"bad have-notice: {exc}\n") from None
    return web.Response(status=204)


async def records(request: web.Request) -> web.Response:
    """The machine records this peer holds (peer/core/machine_records.py), for enrolled
    peers only: each record is signed by the node that made it, so a peer that relays
    them cannot change them."""
    site = request.app[SITE]
    request.get(PEER) or authenticate(request, b"", changes_state=False)
    body = await asyncio.get_running_loop().run_in_executor(None, site.records_bytes)
    return web.Response(body=body, content_type="application/json")


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
    app.middlewares.append(signed_reads)
    app.router.add_get("/v1/peer", hello)
    app.router.add_post("/v1/have", have)
    app.router.add_get("/v1/catalog", catalog)
    app.router.add_get("/v1/records", records)
    app.router.add_get("/v1/manifests/{manifest_id:[0-9a-f]{64}}", manifest)
