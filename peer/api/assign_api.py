"""Assignments over HTTP, for `pxepeer assign --url PEER --token T` (peer/api/auth.py
lets only technician and operator tokens through to POST, viewers to GET).

    GET  /v1/assignments   every machine's assignment, as the site's records say
    POST /v1/assignments   {"mac": MAC, "image": NAME | "local" | null, "again": bool}
                           null clears; answers {"mac", "image", "changed", "message"}

The record is made as `pxepeer assign` makes it on the peer itself (next_assignment,
the same checks in peer/store/assignments.py) and goes through the site (Site.add_records):
signed by this node, written to state/machines.json by the record store, replicated to
every peer of the site. A refused request (400) changes nothing and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from imaging.strict_json import StrictJsonError, loads
from peer.adapters.site import Site
from peer.api.auth import TOKEN
from peer.api.http_guard import read_body
from peer.core.machine_records import next_assignment
from peer.core.rejections import Rejections
from peer.store.assignments import (
    changed_message,
    image_problem,
    known_image_names,
    unchanged_message,
)
from peer.store.content_store import StoreError, normalize_mac

log = logging.getLogger("pxepeer.assign")

ASSIGN_INPUT = "assignment"  # Rejections kind
MAX_BODY = 4096


class AssignRefused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse_request(body: bytes) -> tuple[str, str | None, bool]:
    """(MAC, image or None to clear, again) from a request body; AssignRefused if bad."""
    try:
        doc = loads(body, MAX_BODY)
    except StrictJsonError as exc:
        raise AssignRefused("bad_json", f"not a JSON object: {exc}") from None
    if not isinstance(doc, dict) or set(doc) - {"mac", "image", "again"}:
        raise AssignRefused("bad_fields", 'want {"mac": MAC, "image": NAME|null, "again": bool}')
    mac, image, again = doc.get("mac"), doc.get("image"), doc.get("again", False)
    if not isinstance(mac, str) or not isinstance(again, bool):
        raise AssignRefused("bad_fields", '"mac" must be a string and "again" true or false')
    if image is not None and not isinstance(image, str):
        raise AssignRefused("bad_fields", '"image" must be a name, "local" or null')
    try:
        mac = normalize_mac(mac[:64])
    except StoreError as exc:
        raise AssignRefused("bad_mac", str(exc)) from None
    if image is None and again:
        raise AssignRefused("bad_fields", '"again" needs an image')
    problem = image_problem(image, None, "")
    if problem:
        raise AssignRefused("bad_image", problem)
    return mac, image, again


class AssignApi:
    def __init__(self, site: Site, rejections: Rejections):
        self.site, self.rejections = site, rejections
        # One assignment at a time in this daemon: each reads the book it changes.
        self._lock = asyncio.Lock()

    async def list(self, request: web.Request) -> web.Response:
        machines = [
            {"mac": m.mac, "image": m.assigned, "generation": m.generation,
             "imaged_for_assignment": m.imaged_for_assignment}
            for m in self.site.records.machines() if m.assigned is not None
        ]  # fmt: skip
        return web.json_response({"assignments": machines})

    async def assign(self, request: web.Request) -> web.Response:
        body = await read_body(request, MAX_BODY, timeout=5.0)
        try:
            mac, image, again = parse_request(body)
            if image_problem(image, None, "") is None and image not in (None, "local"):
                loop = asyncio.get_running_loop()
                known = await loop.run_in_executor(None, known_image_names, self.site.store)
                problem = image_problem(image, known, "this peer's store")
                if problem:
                    raise AssignRefused("unknown_image", problem)
        except AssignRefused as exc:
            self.rejections.count(ASSIGN_INPUT, exc.reason)
            raise web.HTTPBadRequest(
                text=f"{exc}\n", headers={"X-Pxepeer-Error": str(exc).replace("\n", " ")}
            ) from None
        async with self._lock:
            # Take what `pxepeer assign` on this machine wrote meanwhile, so the new
            # record's generation follows the newest one.
            await self.site.add_records([])
            book = self.site.records
            record = next_assignment(book, mac, image, again, int(time.time()), self.site.node_id)
            if record is None:
                message = unchanged_message(book, mac, image)
            else:
                try:
                    await self.site.add_records([record])
                except OSError as exc:
                    log.error("cannot write the assignment of %s: %s", mac, exc)
                    raise web.HTTPInternalServerError(
                        text=f"cannot write the machine records: {exc.strerror}\n"
                    ) from None
                message = changed_message(mac, image, again)
                token = request.get(TOKEN)
                log.info("%s (token %s, from %s)", message,
                         token.name if token else "none", request.remote)  # fmt: skip
        return web.json_response(
            {"mac": mac, "image": image, "changed": record is not None, "message": message}
        )


def add_assign_routes(app: web.Application, site: Site, rejections: Rejections) -> AssignApi:
    api = AssignApi(site, rejections)
    app.router.add_get("/v1/assignments", api.list)
    app.router.add_post("/v1/assignments", api.assign)
    return api
