"""API tokens: the store (hashed, atomic, re-read when changed), the role decision, the
route table and the middleware that applies them."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from peer.api.assign_api import AssignRefused, add_assign_routes, parse_request
from peer.api.auth import AUTH_INPUT, ROUTE_NEEDS, install_api_auth, need_of, presented_token
from peer.api.grub_boot import add_grub_routes
from peer.api.http_server import build_app
from peer.api.imaging_api import add_imaging_routes
from peer.api.peer_api import add_peer_routes
from peer.core.api_access import (
    BOOT,
    OPERATOR,
    PEER,
    ROLE_NAMES,
    TECHNICIAN,
    VIEWER,
    Credential,
    Role,
    decide,
)
from peer.core.rejections import Rejections
from peer.store.tokens import TOKENS_FILE, TokenError, TokenStore, parse_token
from peer.token_cli import ROLE_NAMES as CLI_ROLES

# -- the store ------------------------------------------------------------------------------


def test_a_token_is_shown_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, entry = store.create(Role.TECHNICIAN, "alice")
    secret = parse_token(token)
    assert token.startswith("pxp_") and secret is not None and len(secret) == 32
    text = (tmp_path / TOKENS_FILE).read_text()
    assert token not in text and token[4:] not in text
    [stored] = json.loads(text)["tokens"]
    assert stored == {"sha256": entry.sha256, "role": "technician", "name": "alice",
                      "created": entry.created}  # fmt: skip
    assert os.stat(tmp_path / TOKENS_FILE).st_mode & 0o777 == 0o600
    assert store.lookup(token) == entry


def test_wrong_malformed_and_non_canonical_tokens_are_not_found(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create(Role.OPERATOR, "ops")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert store.lookup(flipped) is None
    assert store.lookup("") is None and store.lookup(token + "x") is None
    assert store.lookup("Bearer " + token) is None
    # The same 32 bytes spelled with padding are not the token: one token, one string.
    raw = parse_token(token)
    assert raw is not None
    assert store.lookup("pxp_" + base64.urlsafe_b64encode(raw).decode()) is None


def test_revoke_by_name_or_id_and_a_daemon_sees_it_without_restart(tmp_path: Path) -> None:
    daemon, cli = TokenStore(tmp_path), TokenStore(tmp_path)
    first, one = cli.create(Role.VIEWER, "grafana")
    second, two = cli.create(Role.VIEWER)
    assert two.name == f"viewer-{two.token_id}"
    assert daemon.lookup(first) == one and daemon.lookup(second) == two
    assert cli.revoke("grafana") == one
    assert daemon.lookup(first) is None and daemon.lookup(second) == two
    assert cli.revoke(two.token_id) == two
    assert daemon.lookup(second) is None
    with pytest.raises(TokenError):
        cli.revoke("grafana")


def test_names_are_unique(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    store.create(Role.VIEWER, "bob")
    with pytest.raises(TokenError, match="exists"):
        store.create(Role.OPERATOR, "bob")
    assert len(store.entries()) == 1


def test_a_token_made_on_one_store_is_added_to_another_by_its_hash_only(tmp_path: Path) -> None:
    made, other = TokenStore(tmp_path / "a"), TokenStore(tmp_path / "b")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    token, entry = made.create(Role.VIEWER, "prometheus")
    other.create(Role.OPERATOR, "ops")
    added = other.add(Role.VIEWER, "prometheus", token)
    assert added.sha256 == entry.sha256 and other.lookup(token) == added
    assert token not in (tmp_path / "b" / TOKENS_FILE).read_text()
    with pytest.raises(TokenError, match="already here"):
        other.add(Role.OPERATOR, "again", token)
    with pytest.raises(TokenError, match="not a pxepeer token"):
        other.add(Role.VIEWER, "x", token[:-1])
    with pytest.raises(TokenError, match="exists"):
        other.add(Role.VIEWER, "ops", made.create(Role.VIEWER)[0])
    assert [e.name for e in other.entries()] == ["ops", "prometheus"]


def test_the_api_closes_at_the_first_token_and_stays_closed_when_all_are_revoked(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path)
    assert not store.enforced
    store.create(Role.VIEWER, "v")
    assert store.enforced
    store.revoke("v")
    assert store.enforced and store.entries() == []


def test_an_unreadable_token_file_accepts_no_token_and_keeps_the_api_closed(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create(Role.OPERATOR, "ops")
    (tmp_path / TOKENS_FILE).write_text('{"tokens": [{"sha256": 5}]}')
    assert store.lookup(token) is None and store.enforced
    with pytest.raises(TokenError):
        store.entries()


# -- the decision ---------------------------------------------------------------------------


def _decide(need, credential=Credential.NONE, role=None, loopback=False, open_loopback=True,
            enforced=True):  # fmt: skip
    return decide(need, credential, role, loopback=loopback, open_loopback=open_loopback,
                  enforced=enforced)  # fmt: skip


def test_roles_are_ordered_and_higher_roles_do_what_lower_ones_may() -> None:
    assert Role.VIEWER < Role.TECHNICIAN < Role.OPERATOR
    assert CLI_ROLES == ROLE_NAMES
    for need, lowest in ((VIEWER, Role.VIEWER), (TECHNICIAN, Role.TECHNICIAN),
                         (OPERATOR, Role.OPERATOR)):  # fmt: skip
        for role in Role:
            decision = _decide(need, Credential.VALID, role)
            assert decision.allowed == (role >= lowest)
            if not decision.allowed:
                assert (decision.status, decision.reason) == (403, "forbidden")


def test_reads_are_open_on_loopback_only_when_configured_and_changes_never_are() -> None:
    assert _decide(VIEWER, loopback=True).allowed
    assert _decide(VIEWER, loopback=True, open_loopback=False).reason == "missing"
    assert _decide(VIEWER, loopback=False).reason == "missing"
    assert _decide(TECHNICIAN, loopback=True).status == 401
    # A store that never issued a token: reads open to all, changes still closed.
    assert _decide(VIEWER, enforced=False).allowed
    assert _decide(OPERATOR, enforced=False, loopback=True).reason == "missing"


def test_a_wrong_token_is_refused_even_where_none_is_needed_but_boot_and_peer_ignore_it() -> None:
    assert _decide(VIEWER, Credential.INVALID, loopback=True).reason == "invalid"
    assert _decide(VIEWER, Credential.INVALID, enforced=False).status == 401
    for need in (BOOT, PEER):
        assert _decide(need, Credential.INVALID).allowed
        assert _decide(need, Credential.NONE, open_loopback=False).allowed


def test_authorization_headers_bearer_and_basic_password() -> None:
    assert presented_token(None) is None
    assert presented_token("Bearer pxp_x") == "pxp_x"
    assert presented_token("bearer  pxp_x ") == "pxp_x"
    basic = base64.b64encode(b"anyone:pxp_y").decode()
    assert presented_token(f"Basic {basic}") == "pxp_y"
    assert presented_token("Basic %%%") == ""
    assert presented_token("Digest abc") == ""
    assert presented_token("Bearer " + "a" * 600) == ""
    assert presented_token("Basic " + base64.b64encode(b"\xff:\xfe\x00").decode()) == ""


# -- the route table ----------------------------------------------------------------------


def _daemon_app(tmp_path: Path) -> web.Application:
    """Every route the daemon serves, registered as the daemon registers them."""
    store = SimpleNamespace(state_dir=tmp_path)
    site = SimpleNamespace(store=store, credentials=None, records=None)
    app = build_app(SimpleNamespace())  # type: ignore[arg-type]
    add_peer_routes(app, site)  # type: ignore[arg-type]
    add_imaging_routes(app, site, None, store, None)  # type: ignore[arg-type]
    add_grub_routes(app)
    add_assign_routes(app, site, Rejections())  # type: ignore[arg-type]
    return app


def test_every_route_of_the_daemon_is_listed_in_the_access_table(tmp_path: Path) -> None:
    routes = {(r.resource.canonical, r.method) for r in _daemon_app(tmp_path).router.routes()}
    unlisted = sorted({c for c, _ in routes} - set(ROUTE_NEEDS) - {"/"})
    assert unlisted == [], "classify these in peer/api/auth.py ROUTE_NEEDS"
    needs = {(c, m): need_of(c, m) for c, m in routes}
    # What firmware and the imager fetch needs no token.
    for path in ("/boot.ipxe", "/boot.grub", "/v1/chunks/{sha256}", "/v1/imaging/plan",
                 "/v1/imaging/progress", "/v1/images/{manifest_id}/files/{role}",
                 "/v1/boot/{manifest_id}.ipxe", "/boot/{name}"):  # fmt: skip
        assert all(n == BOOT for (c, _), n in needs.items() if c == path), path
    assert needs[("/v1/have", "POST")] == PEER and needs[("/v1/peer", "GET")] == PEER
    assert needs[("/v1/status", "GET")] == VIEWER and needs[("/metrics", "GET")] == VIEWER
    assert needs[("/v1/assignments", "POST")] == TECHNICIAN
    assert needs[("/v1/assignments", "GET")] == VIEWER


def test_routes_nobody_listed_need_a_viewer_to_read_and_an_operator_to_change() -> None:
    assert need_of("/v1/something-new", "GET") == VIEWER
    assert need_of("/v1/images/{name}/pause", "POST") == OPERATOR


def test_assignment_requests_are_parsed_strictly() -> None:
    assert parse_request(b'{"mac": "52-54-00-AA-BB-CC", "image": "demo"}') == (
        "52:54:00:aa:bb:cc", "demo", False)  # fmt: skip
    assert parse_request(b'{"mac": "52:54:00:aa:bb:cc", "image": null}')[1] is None
    for body, reason in ((b"[]", "bad_fields"), (b"{", "bad_json"),
                         (b'{"mac": "x", "image": "demo"}', "bad_mac"),
                         (b'{"mac": "52:54:00:aa:bb:cc", "image": "a b"}', "bad_image"),
                         (b'{"mac": "52:54:00:aa:bb:cc", "image": "d", "x": 1}', "bad_fields"),
                         (b'{"mac": "52:54:00:aa:bb:cc", "image": null, "again": true}',
                          "bad_fields"),
                         # Hostile JSON: never a traceback, always the parser's refusal.
                         (b'{"mac": 1e999, "image": null}', "bad_json"),
                         (b'{"mac": "\\ud800", "image": "demo"}', "bad_json"),
                         (b'{"mac": NaN}', "bad_json"),
                         (b"[" * 10_000 + b"]" * 10_000, "bad_json"),
                         (b'{"mac": "' + b"a" * 5000 + b'"}', "bad_json")):  # fmt: skip
        with pytest.raises(AssignRefused) as caught:
            parse_request(body)
        assert caught.value.reason == reason


# -- the middleware -----------------------------------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _client(tmp_path: Path, rejections: Rejections, open_loopback: bool,
            changed: list[str]) -> TestClient:  # fmt: skip
    async def change(request: web.Request) -> web.Response:
        changed.append(await request.text())
        return web.Response(text="changed")

    app = web.Application()
    for path in ("/v1/status", "/metrics", "/boot.ipxe", "/v1/chunks/{sha256}"):
        app.router.add_get(path, _ok)
    app.router.add_post("/v1/imaging/progress", _ok)
    app.router.add_post("/v1/assignments", change)
    app.router.add_post("/v1/images/{name}/pause", change)
    install_api_auth(app, TokenStore(tmp_path), rejections, open_loopback)
    return TestClient(TestServer(app, host="127.0.0.1"))


def test_middleware_refuses_counts_and_changes_nothing(tmp_path: Path) -> None:
    rejections, changed = Rejections(), []
    store = TokenStore(tmp_path)

    async def scenario() -> None:
        async with _client(tmp_path, rejections, False, changed) as client:
            # No token issued yet: reads open, changes closed.
            assert (await client.get("/v1/status")).status == 200
            assert (await client.post("/v1/assignments", data="x")).status == 401
            viewer, _ = store.create(Role.VIEWER, "v")
            tech, _ = store.create(Role.TECHNICIAN, "t")
            ops, _ = store.create(Role.OPERATOR, "o")
            missing = await client.get("/v1/status")
            assert missing.status == 401
            challenges = missing.headers.getall("WWW-Authenticate")
            assert challenges[0].startswith("Bearer ") and challenges[1].startswith("Basic ")
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer pxp_nope"})
            assert wrong.status == 401 and "invalid_token" in wrong.headers["WWW-Authenticate"]
            auth = {"Authorization": f"Bearer {viewer}"}
            assert (await client.get("/v1/status", headers=auth)).status == 200
            basic = base64.b64encode(f"me:{viewer}".encode()).decode()
            headers = {"Authorization": f"Basic {basic}"}
            assert (await client.get("/metrics", headers=headers)).status == 200
            assert (await client.post("/v1/assignments", data="v", headers=auth)).status == 403
            tech_auth = {"Authorization": f"Bearer {tech}"}
            pause = "/v1/images/x/pause"
            assert (await client.post(pause, data="t", headers=tech_auth)).status == 403
            assert changed == []
            assert (await client.post("/v1/assignments", data="t", headers=tech_auth)).status == 200
            ops_auth = {"Authorization": f"Bearer {ops}"}
            assert (await client.post(pause, data="o", headers=ops_auth)).status == 200
            # Boot routes ask for nothing, and a stray header does not hurt them.
            assert (await client.get("/boot.ipxe")).status == 200
            assert (await client.get("/v1/chunks/ab", headers={"Authorization": "x"})).status == 200
            assert (await client.post("/v1/imaging/progress")).status == 200
            assert changed == ["t", "o"]

    asyncio.run(scenario())
    assert rejections.snapshot()[AUTH_INPUT] == {"missing": 2, "invalid": 1, "forbidden": 2}


def test_loopback_reads_need_no_token_when_open(tmp_path: Path) -> None:
    TokenStore(tmp_path).create(Role.VIEWER, "v")
    rejections = Rejections()

    async def scenario() -> None:
        async with _client(tmp_path, rejections, True, []) as client:
            assert (await client.get("/v1/status")).status == 200
            assert (await client.post("/v1/assignments")).status == 401

    asyncio.run(scenario())
    assert rejections.snapshot() == {AUTH_INPUT: {"missing": 1}}
