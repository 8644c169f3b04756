"""Site overrides: the store file (peer/store/overrides.py) and the API that changes it
(peer/api/override_api.py): hostile bodies are refused by reason and counted, changing
nothing; an operator token is needed; fields merge and null gives a field back to the
catalog or control document."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imaging.catalog import Catalog, CatalogEntry
from imaging.control import ControlEntry
from peer.api.auth import ROUTE_NEEDS, install_api_auth, need_of
from peer.api.override_api import (
    MAX_BODY,
    OVERRIDE_INPUT,
    OverrideRefused,
    add_override_routes,
    parse_body,
    parse_name,
)
from peer.core.api_access import OPERATOR, PEER, VIEWER, Role
from peer.core.rejections import Rejections
from peer.core.site_core import SiteCore, SiteSettings
from peer.store.overrides import OVERRIDES_FILE, OverrideStore
from peer.store.tokens import TokenStore

NOW = 1_800_000_000


# -- the request body ---------------------------------------------------------------------


def test_a_body_sets_the_fields_it_names_and_null_clears_one() -> None:
    assert parse_body(b'{"paused": true}') == (True, None, frozenset())
    assert parse_body(b'{"priority": -4, "paused": false}') == (False, -4, frozenset())
    assert parse_body(b'{"paused": null, "priority": 2}') == (None, 2, frozenset({"paused"}))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"priority": 1e999}', "bad_json"),
        (b'{"priority": NaN}', "bad_json"),
        (b'{"paused": "\\ud800"}', "bad_json"),
        (b"[" * 200 + b"]" * 200, "bad_json"),
        (b'{"paused": true, "x": "' + b"a" * MAX_BODY + b'"}', "bad_json"),
        (b"\xff", "bad_json"),
        (b"{}", "bad_fields"),
        (b"[]", "bad_fields"),
        (b'{"paused": 1}', "bad_fields"),
        (b'{"priority": true}', "bad_fields"),
        (b'{"priority": 1000001}', "bad_fields"),
        (b'{"priority": "5"}', "bad_fields"),
        (b'{"paused": true, "version": "1"}', "bad_fields"),
    ],
)
def test_hostile_bodies_are_refused_by_reason(body: bytes, reason: str) -> None:
    with pytest.raises(OverrideRefused) as info:
        parse_body(body)
    assert info.value.reason == reason


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 65, "-x", "\u00e9"])
def test_image_names_follow_the_cli_rule(name: str) -> None:
    with pytest.raises(OverrideRefused):
        parse_name(name)


def test_the_routes_are_classified() -> None:
    assert ROUTE_NEEDS["/v1/control"] == PEER
    assert need_of("/v1/overrides/{image}", "PUT") == OPERATOR
    assert need_of("/v1/overrides/{image}", "DELETE") == OPERATOR
    assert need_of("/v1/overrides", "GET") == VIEWER


# -- the store ------------------------------------------------------------------------------


def test_overrides_merge_persist_and_clear(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path)
    store.set("a", True, None)
    store.set("a", None, 5)
    assert OverrideStore(tmp_path).load() == {"a": ControlEntry("a", True, 5)}
    store.set("a", None, None, frozenset({"paused"}))
    assert store.load() == {"a": ControlEntry("a", None, 5)}
    assert store.clear("a") == ({}, True)
    assert store.clear("a") == ({}, False)
    store.set("b", False, None)
    store.set("b", None, None, frozenset({"paused"}))  # nothing left: no entry
    assert store.load() == {}


def test_a_garbled_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    (tmp_path / OVERRIDES_FILE).write_bytes(b'{"format": "pxepeer-overrides/1", "images": [1e999]}')
    assert OverrideStore(tmp_path).load() == {}


# -- the API --------------------------------------------------------------------------------


class FakeSite:
    """What the API uses of peer/adapters/site.py Site: a real core and override store."""

    def __init__(self, state_dir: Path):
        settings = SiteSettings(node_id="00000000000000aa", site="s", address=None,
                                http_port=8080, can_answer_pxe=False)  # fmt: skip
        self.core = SiteCore(settings, now=0.0, wall=NOW)
        self.core.catalog = Catalog(1, NOW, NOW + 86400, (CatalogEntry("demo", "1", "a" * 64),))
        self.store = OverrideStore(state_dir)
        self.control_bytes = None
        self.images: dict = {}

    @property
    def catalog(self) -> Catalog | None:
        return self.core.catalog

    async def set_override(self, name, paused, priority, clear=frozenset()):
        self.core.overrides = self.store.set(name, paused, priority, clear)
        return self.core.overrides.get(name)

    async def clear_override(self, name):
        self.core.overrides, had = self.store.clear(name)
        return had


def test_the_api_needs_an_operator_and_refuses_bad_input_changing_nothing(
    tmp_path: Path,
) -> None:
    rejections, tokens = Rejections(), TokenStore(tmp_path)
    site = FakeSite(tmp_path)
    app = web.Application()
    add_override_routes(app, site, rejections)  # type: ignore[arg-type]
    install_api_auth(app, tokens, rejections)
    operator, _ = tokens.create(Role.OPERATOR, "o")
    technician, _ = tokens.create(Role.TECHNICIAN, "t")
    as_op = {"Authorization": f"Bearer {operator}"}
    as_tech = {"Authorization": f"Bearer {technician}"}

    async def scenario() -> None:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            put = "/v1/overrides/demo"
            assert (await client.put(put, data=b'{"paused": true}')).status == 401
            assert (await client.put(put, data=b'{"paused": true}', headers=as_tech)).status == 403
            assert (await client.delete(put, headers=as_tech)).status == 403
            for body in (b'{"paused": 1e999}', b'{"paused": "yes"}', b"{}"):
                assert (await client.put(put, data=body, headers=as_op)).status == 400
            missing = await client.put("/v1/overrides/nope", data=b'{"paused": true}',
                                       headers=as_op)  # fmt: skip
            assert missing.status == 404
            assert not (tmp_path / OVERRIDES_FILE).exists()
            done = await client.put(put, data=b'{"paused": true, "priority": 3}', headers=as_op)
            answer = await done.json()
            assert answer["effective"] == {"paused": True, "priority": 3,
                                           "paused_by": "site override",
                                           "priority_by": "site override"}  # fmt: skip
            assert site.core.wanted_ids(0.0) == []
            listed = await (await client.get("/v1/overrides")).json()
            assert listed["overrides"] == [{"name": "demo", "paused": True, "priority": 3}]
            gone = await (await client.delete(put, headers=as_op)).json()
            assert gone["changed"] is True and gone["effective"]["paused_by"] == "catalog"
            assert site.core.wanted_ids(0.0) == ["a" * 64]
            assert (await client.get("/v1/control")).status == 404

    asyncio.run(scenario())
    counts = rejections.snapshot()
    assert counts["api_auth"] == {"missing": 1, "forbidden": 2}
    assert counts[OVERRIDE_INPUT] == {"bad_json": 1, "bad_fields": 2, "unknown_image": 1}
    assert json.loads((tmp_path / OVERRIDES_FILE).read_text())["images"] == []
