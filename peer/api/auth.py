"""Bearer tokens on the HTTP API: which route needs what, and the middleware that checks.

Every route is in ROUTE_NEEDS by its path pattern (tests/unit/test_api_tokens.py fails
when a route of the daemon is missing from it). A route nobody listed needs a token
anyway: `viewer` to read, `operator` to change: a new page is closed until someone
decides it should be open. The decision itself is peer/core/api_access.py's.

Tokens come as `Authorization: Bearer pxp_...`, or as the password of HTTP Basic (any
user name) so a browser can open the dashboard: it shows its login box on the Basic
challenge that read routes add to their 401. Refusals are 401 (no token, or one this
store did not issue: WWW-Authenticate says so) or 403 (a token whose role is too low),
change nothing (the handler never runs, the body is never read) and are counted in
Rejections as `api_auth` by reason: missing, invalid, forbidden.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from ipaddress import ip_address

from aiohttp import web
from multidict import CIMultiDict

from peer.api.grub_boot import GRUB_CONFIG_PATH
from peer.core.api_access import (
    BOOT,
    OPERATOR,
    PEER,
    TECHNICIAN,
    VIEWER,
    Credential,
    Decision,
    Group,
    Need,
    Role,
    decide,
)
from peer.core.rejections import Rejections
from peer.store.tokens import TokenEntry, TokenStore

log = logging.getLogger("pxepeer.auth")

AUTH_INPUT = "api_auth"  # Rejections kind
MAX_AUTH_HEADER = 512
REALM = 'realm="pxepeer"'

# Path pattern (aiohttp's canonical form) -> what it needs, for every method it has.
ROUTE_NEEDS: dict[str, Need] = {
    # Booting machines: firmware, iPXE and GRUB send no token, and get only boot scripts
    # and publisher-signed content (peer/api/http_server.py, grub_boot.py).
    "/boot.ipxe": BOOT,
    "/v1/boot/{manifest_id}.ipxe": BOOT,
    "/v1/images/{manifest_id}/files/{role}": BOOT,
    "/boot/{name}": BOOT,
    "/{name}": BOOT,  # /grub/...: GRUB's bootstrap over UEFI HTTP boot
    GRUB_CONFIG_PATH: BOOT,
    # Chunks: booting machines (via image files) and peers; the receiver hashes each one.
    "/v1/chunks/{sha256}": BOOT,
    # The imaging agent: signed manifests, its plan, and its reports (which carry the
    # job's secret from the plan: peer/api/imaging_api.py).
    "/v1/manifests/{manifest_id}/canonical": BOOT,
    "/v1/manifests/{manifest_id}/signatures": BOOT,
    "/v1/imaging/plan": BOOT,
    "/v1/imaging/progress": BOOT,
    # The peer protocol: signed requests (peer/api/peer_api.py), or publisher-signed data.
    "/v1/peer": PEER,
    "/v1/have": PEER,
    "/v1/catalog": PEER,
    "/v1/control": PEER,  # operator-signed: peers verify it (peer/api/override_api.py)
    "/v1/records": PEER,
    "/v1/manifests/{manifest_id}": PEER,
    # The API: what a person or a monitoring system reads, and what changes the site.
    "/": VIEWER,  # the dashboard (peer/api/dashboard.py), its assets and its data
    "/dashboard.js": VIEWER,
    "/dashboard.css": VIEWER,
    "/v1/dashboard": VIEWER,
    "/v1/status": VIEWER,
    "/metrics": VIEWER,
    "/v1/images": VIEWER,
    "/v1/imaging": VIEWER,
    "/v1/assignments": TECHNICIAN,
    # Site-local pause and priority (peer/api/override_api.py): operators only.
    "/v1/overrides": VIEWER,
    "/v1/overrides/{image}": OPERATOR,
}
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def need_of(canonical: str, method: str, extra: dict[str, Need] | None = None) -> Need:
    """What a route needs; routes nobody listed need viewer to read, operator to change."""
    need = (extra or {}).get(canonical) or ROUTE_NEEDS.get(canonical)
    if need is not None:
        # A listed API route needs its role to change anything, viewer to read it.
        if need.group is Group.CHANGE and method in READ_METHODS:
            return VIEWER
        return need
    return VIEWER if method in READ_METHODS else OPERATOR


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False  # a Unix socket or a closed transport: not known to be local
    try:
        address = ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def presented_token(header: str | None) -> str | None:
    """The token in an Authorization header (Bearer, or Basic's password); "" for a
    header that holds none; None for no header."""
    if header is None:
        return None
    if len(header) > MAX_AUTH_HEADER:
        return ""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return ""
        return decoded.partition(":")[2]
    return ""


@dataclass
class ApiAuth:
    tokens: TokenStore
    rejections: Rejections
    open_loopback: bool = True
    extra: dict[str, Need] | None = None

    def check(self, request: web.Request) -> TokenEntry | None:
        """The token the request is allowed by (None: allowed without one); raises the
        401 or 403 otherwise, counted."""
        route = request.match_info.route
        if request.match_info.http_exception is not None or route.resource is None:
            return None  # 404 / 405: the router answers, nothing is served
        need = need_of(route.resource.canonical, request.method, self.extra)
        if need.group in (Group.BOOT, Group.PEER):
            return None
        text = presented_token(request.headers.get("Authorization"))
        entry = self.tokens.lookup(text) if text else None
        credential = (
            Credential.NONE if text is None else Credential.VALID if entry else Credential.INVALID
        )
        decision = decide(
            need, credential, entry.role if entry else None,
            loopback=is_loopback(request.remote), open_loopback=self.open_loopback,
            enforced=self.tokens.enforced,
        )  # fmt: skip
        if decision.allowed:
            return entry
        self.rejections.count(AUTH_INPUT, decision.reason)
        log.debug("%s %s from %s refused: %s", request.method, request.path,
                  request.remote, decision.reason)  # fmt: skip
        raise _refusal(decision, need, entry)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        entry = self.check(request)
        if entry is not None:
            request[TOKEN] = entry
        return await handler(request)

    def status(self) -> dict[str, object]:
        return {
            "enforced": self.tokens.enforced,
            "open_loopback": self.open_loopback,
            "refused": self.rejections.snapshot().get(AUTH_INPUT, {}),
        }


TOKEN = web.RequestKey("api_token", TokenEntry)  # the token a request was allowed by
API_AUTH = web.AppKey("api_auth", ApiAuth)


def _refusal(decision: Decision, need: Need, entry: TokenEntry | None) -> web.HTTPException:
    if decision.status == 403:
        assert entry is not None and need.role is not None
        text = (f"token {entry.name!r} is a {entry.role.label} token; this needs "
                f"{need.role.label}")  # fmt: skip
        headers = CIMultiDict({"WWW-Authenticate": f'Bearer {REALM}, error="insufficient_scope"'})
        return web.HTTPForbidden(text=text + "\n", headers=headers)
    if decision.reason == "invalid":
        text = "not a token this peer issued (wrong, revoked or malformed)"
        headers = CIMultiDict({"WWW-Authenticate": f'Bearer {REALM}, error="invalid_token"'})
    else:
        text = "this needs a token: Authorization: Bearer TOKEN (pxepeer token new)"
        headers = CIMultiDict({"WWW-Authenticate": f"Bearer {REALM}"})
    if need.role is Role.VIEWER:
        # Browsers cannot send a bearer token for a page: the Basic challenge makes them
        # ask for it (any user name, the token as password).
        headers.add("WWW-Authenticate", f'Basic {REALM}, charset="UTF-8"')
    return web.HTTPUnauthorized(text=text + "\n", headers=headers)


def install_api_auth(
    app: web.Application,
    tokens: TokenStore,
    rejections: Rejections,
    open_loopback: bool = True,
    extra: dict[str, Need] | None = None,
) -> ApiAuth:
    """Check tokens before every other middleware (before any body is read). Call
    before the app is frozen."""
    auth = ApiAuth(tokens, rejections, open_loopback, extra)
    app[API_AUTH] = auth
    app.middlewares.insert(0, auth.middleware)
    return auth


__all__ = ["API_AUTH", "OPERATOR", "TOKEN", "ApiAuth", "install_api_auth", "need_of"]
