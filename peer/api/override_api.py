"""Site-local image overrides over HTTP, for `pxepeer catalog set IMAGE --url PEER --token T`
(peer/api/auth.py lets only operator tokens through to PUT and DELETE, viewers to GET),
and the control document for the peers of the site.

    GET    /v1/overrides         this peer's overrides and every catalog image's settings
                                 in force, with where each comes from
    PUT    /v1/overrides/{image} {"paused": true|false|null, "priority": N|null}: the
                                 fields given are set (null: back to the catalog or the
                                 control document), the others kept
    DELETE /v1/overrides/{image} the image follows the catalog and control document again
    GET    /v1/control           the control document this peer follows (operator-signed:
                                 peers verify it like the origin's)

An override is a machine record signed by this node (peer/core/machine_records.py), kept
in state/machines.json and pulled by every peer of the site like an assignment, so the
whole site (the store) honours it. A refused request (400, 404) changes nothing and is
counted as `override` by reason.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from imaging import doc_fields
from imaging.catalog import MAX_PRIORITY
from imaging.doc_fields import FieldError
from imaging.strict_json import StrictJsonError, loads
from peer.adapters.site import Site
from peer.api.auth import TOKEN
from peer.api.http_guard import read_body
from peer.core.machine_records import RecordError
from peer.core.rejections import Rejections

log = logging.getLogger("pxepeer.overrides")

OVERRIDE_INPUT = "override"  # Rejections kind
MAX_BODY = 1024
_FIELDS = frozenset({"paused", "priority"})


class OverrideRefused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def parse_name(text: str) -> str:
    try:
        return doc_fields.token(text, "image")
    except FieldError:
        raise OverrideRefused(
            "bad_name", "an image name is 1-64 letters, digits, '.', '_', '+' or '-'"
        ) from None


def parse_body(body: bytes) -> tuple[bool | None, int | None, frozenset[str]]:
    """(paused, priority, fields to clear) from a PUT body; OverrideRefused if bad."""
    try:
        doc = loads(body, MAX_BODY)
    except StrictJsonError as exc:
        raise OverrideRefused("bad_json", f"not a JSON object: {exc}") from None
    want = 'want {"paused": true|false|null, "priority": N|null}'
    if not isinstance(doc, dict) or not doc or set(doc) - _FIELDS:
        raise OverrideRefused("bad_fields", want)
    try:
        paused = doc.get("paused")
        if paused is not None:
            paused = doc_fields.boolean(paused, "paused")
        priority = doc.get("priority")
        if priority is not None:
            priority = doc_fields.integer(priority, "priority", -MAX_PRIORITY, MAX_PRIORITY)
    except FieldError as exc:
        raise OverrideRefused("bad_fields", f"{exc.detail}; {want}") from None
    clear = frozenset(k for k in doc if doc[k] is None)
    return paused, priority, clear


class OverrideApi:
    def __init__(self, site: Site, rejections: Rejections):
        self.site, self.rejections = site, rejections
        self._lock = asyncio.Lock()

    def _refuse(self, exc: OverrideRefused, status: type[web.HTTPException]) -> web.HTTPException:
        self.rejections.count(OVERRIDE_INPUT, exc.reason)
        return status(text=f"{exc}\n", headers={"X-Pxepeer-Error": str(exc).replace("\n", " ")})

    def _known(self, name: str) -> None:
        """Only an image the catalog or the store names: a typo must not look like a
        pause that took."""
        catalog = self.site.catalog
        in_catalog = catalog is not None and catalog.entry(name) is not None
        held = any(h.manifest.name == name for h in self.site.images.values())
        if not (in_catalog or held):
            raise OverrideRefused("unknown_image", f"no image {name} in the catalog or the store")

    def _answer(self, name: str) -> dict[str, object]:
        override = self.site.core.overrides.get(name)
        in_force = next(
            (state.to_json() for e, state in self.site.core.effective_entries() if e.name == name),
            None,
        )
        return {"image": name, "override": override.to_json() if override else None,
                "effective": in_force}  # fmt: skip

    async def list(self, request: web.Request) -> web.Response:
        control = self.site.core.control_status(self.site.core.effective_entries())
        return web.json_response({"overrides": control["overrides"], "images": control["images"]})

    async def put(self, request: web.Request) -> web.Response:
        body = await read_body(request, MAX_BODY, timeout=5.0)
        try:
            name = parse_name(request.match_info["image"])
            paused, priority, clear = parse_body(body)
        except OverrideRefused as exc:
            raise self._refuse(exc, web.HTTPBadRequest) from None
        try:
            self._known(name)
        except OverrideRefused as exc:
            raise self._refuse(exc, web.HTTPNotFound) from None
        async with self._lock:
            try:
                changed = await self.site.set_override(name, paused, priority, clear)
            except RecordError as exc:
                raise self._refuse(OverrideRefused(exc.reason, str(exc)),
                                   web.HTTPBadRequest) from None  # fmt: skip
            except OSError as exc:
                log.error("cannot write the override of %s: %s", name, exc)
                raise web.HTTPInternalServerError(
                    text=f"cannot write the overrides: {exc.strerror}\n"
                ) from None
        if changed:
            self._log(request, f"site override of {name}: {self.site.core.overrides.get(name)}")
        return web.json_response({**self._answer(name), "changed": changed})

    async def delete(self, request: web.Request) -> web.Response:
        try:
            name = parse_name(request.match_info["image"])
        except OverrideRefused as exc:
            raise self._refuse(exc, web.HTTPBadRequest) from None
        async with self._lock:
            try:
                had = await self.site.clear_override(name)
            except OSError as exc:
                log.error("cannot write the overrides: %s", exc)
                raise web.HTTPInternalServerError(
                    text=f"cannot write the overrides: {exc.strerror}\n"
                ) from None
        if had:
            self._log(request, f"site override of {name} cleared")
        return web.json_response({**self._answer(name), "changed": had})

    def _log(self, request: web.Request, message: str) -> None:
        token = request.get(TOKEN)
        log.info("%s (token %s, from %s)", message, token.name if token else "none",
                 request.remote)  # fmt: skip

    async def control(self, request: web.Request) -> web.Response:
        data = self.site.control_bytes
        if data is None:
            raise web.HTTPNotFound(text="no control document held\n")
        return web.Response(body=data, content_type="application/json")


def add_override_routes(app: web.Application, site: Site, rejections: Rejections) -> OverrideApi:
    api = OverrideApi(site, rejections)
    app.router.add_get("/v1/overrides", api.list)
    app.router.add_put("/v1/overrides/{image}", api.put)
    app.router.add_delete("/v1/overrides/{image}", api.delete)
    app.router.add_get("/v1/control", api.control)
    return api
