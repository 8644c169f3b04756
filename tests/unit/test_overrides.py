"""Site overrides: records in the site's book (peer/core/machine_records.py), replicated
like assignments, and the API that makes them (peer/api/override_api.py): hostile bodies
and records are refused by reason and counted, changing nothing; an operator token is
needed; fields merge and null gives a field back to the catalog or control document."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.catalog import Catalog, CatalogEntry
from imaging.control import ControlEntry
from imaging.signing import SigningKey
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
from peer.core.machine_records import (
    OVERRIDE,
    Record,
    RecordBook,
    RecordError,
    RecordVerifier,
    SignedRecord,
    next_override,
    parse_book,
)
from peer.core.rejections import Rejections
from peer.core.site_core import SiteCore, SiteSettings
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


# -- the records ---------------------------------------------------------------------------


def node() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def signed(key: SigningKey, record: Record) -> SignedRecord:
    return SignedRecord.sign(record, key)


def test_an_override_is_a_record_that_merges_clears_and_round_trips() -> None:
    key = node()
    book, verifier = RecordBook(), RecordVerifier(key.public_key, None)
    first = next_override(book, "demo", True, None, frozenset(), NOW, key.key_id)
    assert first is not None and first.generation == 1
    book.merge([signed(key, first)], {}, verifier)
    second = next_override(book, "demo", None, 5, frozenset(), NOW - 100, key.key_id)
    assert second is not None and (second.generation, second.at) == (2, NOW)
    book.merge([signed(key, second)], {}, verifier)
    assert book.overrides() == {"demo": ControlEntry("demo", True, 5)}
    assert next_override(book, "demo", True, 5, frozenset(), NOW, key.key_id) is None
    cleared = next_override(book, "demo", None, None, frozenset({"paused", "priority"}), NOW,
                            key.key_id)  # fmt: skip
    assert cleared is not None and (cleared.paused, cleared.priority) == (None, None)
    book.merge([signed(key, cleared)], {}, verifier)
    assert book.overrides() == {}
    # Stored and read back, verified again.
    records, certs = parse_book(book.to_bytes())
    again = RecordBook()
    assert again.merge(records, certs, verifier)[1] == {}
    assert again.get("demo", OVERRIDE) == cleared


def test_overrides_are_no_machines_and_leave_other_records_bytes_as_they_were() -> None:
    key = node()
    book, verifier = RecordBook(), RecordVerifier(key.public_key, None)
    assignment = Record("assignment", "52:54:00:00:00:01", 1, "demo", None, NOW, key.key_id)
    assert "paused" not in assignment.to_json()  # signatures made before overrides hold
    override = next_override(book, "demo", True, None, frozenset(), NOW, key.key_id)
    assert override is not None
    book.merge([signed(key, assignment), signed(key, override)], {}, verifier)
    assert [m.mac for m in book.machines()] == ["52:54:00:00:00:01"]
    assert book.assignments() == {"52:54:00:00:00:01": "demo"}


def test_books_that_saw_the_same_overrides_in_any_order_agree() -> None:
    class AnyNode(RecordVerifier):  # two enrolled nodes; certificates are not the point
        def check(self, signed: SignedRecord, cert_bytes: bytes | None) -> None:
            pass

    a, b = node(), node()
    verifier = AnyNode(None, None)
    base = RecordBook()
    from_a = next_override(base, "demo", True, None, frozenset(), NOW, a.key_id)
    from_b = next_override(base, "demo", False, 2, frozenset(), NOW + 1, b.key_id)
    assert from_a is not None and from_b is not None
    one, two = RecordBook(), RecordBook()
    one.merge([signed(a, from_a), signed(b, from_b)], {}, verifier)
    two.merge([signed(b, from_b)], {}, verifier)
    two.merge([signed(a, from_a)], {}, verifier)
    assert one.digest() == two.digest() and one.overrides() == two.overrides()


def _override_json(**changes: object) -> dict:
    doc = {"kind": "override", "mac": "00:00:00:00:00:00", "generation": 1, "image": "demo",
           "manifest_id": None, "paused": True, "priority": None, "at": NOW,
           "by": "0123456789abcdef"}  # fmt: skip
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_override_json(mac="52:54:00:00:00:01"), "bad mac"),
        (_override_json(image="../x"), "bad name"),
        (_override_json(image=None), "bad type"),
        (_override_json(manifest_id="a" * 64), "bad field"),
        (_override_json(paused="yes"), "bad type"),
        (_override_json(priority=10**7), "out of range"),
        (_override_json(by="x"), "bad signer"),
        ({k: v for k, v in _override_json().items() if k != "paused"}, "missing field"),
        ({**_override_json(kind="assignment", mac="52:54:00:00:00:01")}, "bad field"),
    ],
)
def test_hostile_override_records_are_refused_by_reason(doc: dict, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        Record.from_json(doc)
    assert info.value.reason == reason


# -- the API --------------------------------------------------------------------------------


class FakeSite:
    """What the API uses of peer/adapters/site.py Site: a real core and record book."""

    def __init__(self) -> None:
        settings = SiteSettings(node_id="00000000000000aa", site="s", address=None,
                                http_port=8080, can_answer_pxe=False)  # fmt: skip
        self.core = SiteCore(settings, now=0.0, wall=NOW)
        self.core.catalog = Catalog(1, NOW, NOW + 86400, (CatalogEntry("demo", "1", "a" * 64),))
        self.key = node()
        self.records = RecordBook()
        self.verifier = RecordVerifier(self.key.public_key, None)
        self.control_bytes = None
        self.images: dict = {}

    @property
    def catalog(self) -> Catalog | None:
        return self.core.catalog

    async def set_override(self, name, paused, priority, clear=frozenset()) -> bool:
        record = next_override(self.records, name, paused, priority, clear, NOW,
                               self.key.key_id)  # fmt: skip
        if record is None:
            return False
        self.records.merge([signed(self.key, record)], {}, self.verifier)
        self.core.overrides = self.records.overrides()
        return True

    async def clear_override(self, name) -> bool:
        return await self.set_override(name, None, None, frozenset({"paused", "priority"}))


def test_the_api_needs_an_operator_and_refuses_bad_input_changing_nothing(
    tmp_path: Path,
) -> None:
    rejections, tokens = Rejections(), TokenStore(tmp_path)
    site = FakeSite()
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
            assert len(site.records) == 0
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
    assert site.records.get("demo", OVERRIDE).generation == 2  # set, then cleared
