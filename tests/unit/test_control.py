"""Control documents (imaging/control.py): who may sign them, why one is refused, what
applies (catalog < control document < site override), `catalog set` on an origin (two
operators at once included), and the site core following them."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from click.testing import CliRunner

from imaging.catalog import Catalog, CatalogEntry, SignedCatalog
from imaging.control import (
    CONTROL,
    Control,
    ControlEntry,
    ControlError,
    ControlRejected,
    ControlSetError,
    ControlTrust,
    SignedControl,
    accept_control,
    effective,
    next_control,
    next_control_serial,
    read_control,
    set_image,
)
from imaging.origin_layout import CATALOG
from imaging.signing import PublicKey, SigningKey, generate_keypair, load_signing_key
from peer.cli import main
from peer.core.site_core import SiteCore, SiteSettings

NOW = 1_800_000_000
MID_A, MID_B = "a" * 64, "b" * 64


def make_key(tmp_path: Path, role: str) -> tuple[SigningKey, PublicKey]:
    private, _ = generate_keypair(tmp_path, role, role)
    key = load_signing_key(private)
    return key, PublicKey(key.public_key.raw, role, role)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[SigningKey, PublicKey]]:
    return {role: make_key(tmp_path, role) for role in ("publisher", "operator", "enroll")}


def trust_of(keys: dict[str, tuple[SigningKey, PublicKey]]) -> ControlTrust:
    return ControlTrust(pub for _, pub in keys.values())


def control(serial: int = 5, *entries: ControlEntry, expires: int = NOW + 3600) -> Control:
    return Control(serial, NOW - 10, expires, entries or (ControlEntry("a", paused=True),))


# -- the document ---------------------------------------------------------------------------


def test_a_signed_control_document_round_trips(keys) -> None:
    signer = keys["operator"][0]
    doc = control(3, ControlEntry("a", True, None), ControlEntry("b", None, -7))
    signed = SignedControl.sign(doc, signer)
    again = SignedControl.from_bytes(signed.to_bytes())
    assert again.control == doc and again.signer == signer.key_id


def _doc(**changes: object) -> dict:
    inner = {"format": "pxepeer-control/1", "serial": 4, "issued": 1, "expires": 2,
             "images": [{"name": "a", "paused": True, "priority": None}]}  # fmt: skip
    inner.update(changes)
    return {"control": inner, "signatures": []}


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_doc(images=[{"name": "a", "paused": None, "priority": None}]), "empty entry"),
        (_doc(images=[{"name": "a", "paused": True, "priority": 1}] * 2), "duplicate image"),
        (_doc(extra=1), "unknown field"),
        (_doc(serial=0), "out of range"),
        (_doc(serial=True), "bad type"),
        (_doc(expires=0), "expires before issued"),
        (_doc(images=[{"name": "a", "paused": "yes", "priority": None}]), "bad type"),
        (_doc(images=[{"name": "a", "paused": True, "priority": 10**7}]), "out of range"),
        (_doc(images=[{"name": "a\n", "paused": True, "priority": None}]), "bad text"),
        (_doc(images=[{"name": "a", "paused": True}]), "missing field"),
        (_doc(format="pxepeer-catalog/1"), "not a control document"),
        ({"catalog": {}, "signatures": []}, "not a control document"),
    ],
)
def test_malformed_control_documents_are_refused_by_reason(doc: dict, reason: str) -> None:
    with pytest.raises(ControlError) as info:
        SignedControl.from_bytes(json.dumps(doc).encode())
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"control": {"serial": 1e999}, "signatures": []}', "non-finite number"),
        (b'{"control": {"format": "\\ud800"}, "signatures": []}', "invalid unicode"),
        (b'{"control": ' + b"[" * 100 + b"]" * 100 + b"}", "nested too deep"),
        (b"\xff\xfe", "invalid utf-8"),
        (b" " * (1024 * 1024 + 1), "too large"),
        (json.dumps({**_doc(), "signatures": [{"key_id": "x", "ed25519": "y"}]}).encode(),
         "bad signature entry"),
    ],
)
def test_hostile_bytes_are_refused_with_a_short_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ControlError) as info:
        SignedControl.from_bytes(data)
    assert info.value.reason == reason


def test_a_serial_written_as_a_float_is_refused() -> None:
    doc = _doc()
    data = json.dumps(doc).replace('"serial": 4', '"serial": 4.0').encode()
    with pytest.raises(ControlError) as info:
        SignedControl.from_bytes(data)
    assert info.value.reason == "bad type"


# -- who may sign, and replay ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["operator", "publisher"])
def test_operator_and_publisher_keys_may_sign(keys, role: str) -> None:
    signed = SignedControl.sign(control(), keys[role][0])
    accepted, signer = accept_control(signed, trust_of(keys), None, NOW)
    assert accepted == signed.control and signer == keys[role][1].key_id


def test_an_enroll_key_is_trusted_but_may_not_control_images(keys) -> None:
    signed = SignedControl.sign(control(), keys["enroll"][0])
    with pytest.raises(ControlRejected) as info:
        accept_control(signed, trust_of(keys), None, NOW)
    assert info.value.reason == "wrong role"


def test_untrusted_unsigned_and_tampered_documents_are_refused(keys, tmp_path: Path) -> None:
    stranger, _ = make_key(tmp_path / "x", "operator")
    trust = trust_of(keys)
    cases = {
        "untrusted key": SignedControl.sign(control(), stranger),
        "not signed": SignedControl(control(), ()),
        "bad signature": SignedControl(
            control(6), SignedControl.sign(control(5), keys["operator"][0]).signatures
        ),
    }
    for reason, signed in cases.items():
        with pytest.raises(ControlRejected) as info:
            accept_control(signed, trust, None, NOW)
        assert info.value.reason == reason


def test_a_lower_serial_cannot_replay_an_old_active_after_a_pause(keys) -> None:
    op = keys["operator"][0]
    active = control(5, ControlEntry("a", paused=False))
    paused = control(6, ControlEntry("a", paused=True))
    trust = trust_of(keys)
    held, _ = accept_control(SignedControl.sign(paused, op), trust, None, NOW)
    with pytest.raises(ControlRejected) as info:
        accept_control(SignedControl.sign(active, op), trust, held, NOW)
    assert info.value.reason == "rollback"
    # The same serial again: fine if identical (a re-fetch), refused if changed.
    accept_control(SignedControl.sign(paused, op), trust, held, NOW)
    with pytest.raises(ControlRejected) as info:
        accept_control(SignedControl.sign(control(6, ControlEntry("a", False)), op), trust,
                       held, NOW)  # fmt: skip
    assert info.value.reason == "serial reused"


def test_an_expired_document_is_refused(keys) -> None:
    signed = SignedControl.sign(control(expires=NOW - 1), keys["operator"][0])
    with pytest.raises(ControlRejected) as info:
        accept_control(signed, trust_of(keys), None, NOW)
    assert info.value.reason == "expired"


# -- what applies ---------------------------------------------------------------------------


def test_control_overrides_the_catalog_and_a_site_override_overrides_both() -> None:
    entry = CatalogEntry("a", "1", MID_A, priority=3, paused=False)
    assert effective(entry, None, None).to_json() == {
        "paused": False, "priority": 3, "paused_by": "catalog", "priority_by": "catalog"}
    doc = control(9, ControlEntry("a", paused=True))
    state = effective(entry, doc, None)
    assert (state.paused, state.paused_by, state.priority_by) == (True, "control serial 9",
                                                                  "catalog")  # fmt: skip
    state = effective(entry, doc, ControlEntry("a", paused=None, priority=-5))
    assert (state.paused, state.priority, state.priority_by) == (True, -5, "site override")
    state = effective(entry, doc, ControlEntry("a", paused=False))
    assert (state.paused, state.paused_by) == (False, "site override")
    # An entry for another image changes nothing.
    assert effective(entry, control(9, ControlEntry("b", True)), None).paused is False


# -- the origin side ------------------------------------------------------------------------


def test_serials_go_up_and_follow_the_clock() -> None:
    assert next_control_serial(None, NOW) == NOW
    assert next_control_serial(NOW + 5, NOW) == NOW + 6
    first = next_control(None, "a", True, None, NOW)
    second = next_control(first, "a", None, 4, NOW)
    assert second.serial == first.serial + 1
    assert second.entry("a") == ControlEntry("a", True, 4)  # the pause is kept
    with pytest.raises(ControlSetError):
        next_control(second, "a", None, None, NOW)


def _origin(tmp_path: Path, key: SigningKey, *names: str) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir()
    entries = tuple(CatalogEntry(n, "1", MID_A) for n in names)
    cat = Catalog(1, NOW, NOW + 86400, entries)
    (origin / CATALOG).write_bytes(SignedCatalog.sign(cat, key).to_bytes())
    return origin


def _set_many(origin: str, key_path: str, name: str, n: int, out) -> None:
    key = load_signing_key(Path(key_path))
    serials = [set_image(Path(origin), name, key, priority=i, now=NOW).serial for i in range(n)]
    out.put(serials)


def test_two_operators_setting_at_once_lose_no_change_and_share_no_serial(
    tmp_path: Path,
) -> None:
    private, _ = generate_keypair(tmp_path, "operator", "operator")
    origin = _origin(tmp_path, load_signing_key(private), "a", "b")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_set_many, args=(str(origin), str(private), n, 15, out))
             for n in ("a", "b")]  # fmt: skip
    for p in procs:
        p.start()
    serials = out.get(timeout=30) + out.get(timeout=30)
    for p in procs:
        p.join(timeout=30)
    assert len(set(serials)) == 30
    held = read_control(origin)
    assert held is not None and held.control.serial == max(serials)
    assert {e.name: e.priority for e in held.control.entries} == {"a": 14, "b": 14}


def test_an_unreadable_origin_document_is_not_silently_replaced(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "operator", "operator")
    origin = _origin(tmp_path, load_signing_key(private), "a")
    (origin / CONTROL).write_bytes(b"{garbage")
    with pytest.raises(ControlSetError, match="unreadable"):
        set_image(origin, "a", load_signing_key(private), paused=True, now=NOW)
    assert (origin / CONTROL).read_bytes() == b"{garbage"


# -- the CLI --------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), prog_name="pxepeer")
    return result.exit_code, result.stdout, result.stderr


def test_catalog_set_signs_a_control_document_beside_the_catalog(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "operator", "operator")
    origin = _origin(tmp_path, load_signing_key(private), "demo")
    code, out, err = cli("catalog", "set", "demo", "--paused", "--priority", "-3",
                         "--key", str(private), "--to", str(origin))  # fmt: skip
    assert code == 0, err
    assert "demo: paused, priority -3 in control serial" in out
    held = read_control(origin)
    assert held is not None and held.control.entry("demo") == ControlEntry("demo", True, -3)
    code, out, _ = cli("catalog", "set", "demo", "--active", "--key", str(private),
                       "--to", str(origin))  # fmt: skip
    again = read_control(origin)
    assert code == 0 and again is not None and again.control.serial > held.control.serial
    assert again.control.entry("demo") == ControlEntry("demo", False, -3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--paused", "--active"], "exclude each other"),
        ([], "give --paused, --active or --priority N"),
        (["--paused", "--url", "http://127.0.0.1:1"], "exclude each other"),
        (["--priority", "9999999"], "9999999"),
        (["--clear"], "--clear removes a site's override"),
        (["--paused", "--url", "http://127.0.0.1:1", "--token", ""], "--url needs --token"),
    ],
)
def test_bad_catalog_set_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    private, _ = generate_keypair(tmp_path, "operator", "operator")
    origin = _origin(tmp_path, load_signing_key(private), "demo")
    extra = [] if "--url" in args else ["--key", str(private), "--to", str(origin)]
    if "--url" in args and "exclude" in message:
        extra = ["--key", str(private)]
    code, _, err = cli("catalog", "set", "demo", *args, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (origin / CONTROL).exists()


def test_catalog_set_refuses_an_enroll_key_and_an_image_not_in_the_catalog(
    tmp_path: Path,
) -> None:
    enroll, _ = generate_keypair(tmp_path, "enroll", "enroll")
    operator, _ = generate_keypair(tmp_path, "operator", "operator")
    origin = _origin(tmp_path, load_signing_key(operator), "demo")
    code, _, err = cli("catalog", "set", "demo", "--paused", "--key", str(enroll),
                       "--to", str(origin))  # fmt: skip
    assert code == 2 and "enroll key" in err
    code, _, err = cli("catalog", "set", "nope", "--paused", "--key", str(operator),
                       "--to", str(origin))  # fmt: skip
    assert code == 2 and "no image nope" in err
    code, _, err = cli("catalog", "set", "bad/name", "--paused", "--key", str(operator),
                       "--to", str(origin))  # fmt: skip
    assert code == 2 and "image name" in err
    assert not (origin / CONTROL).exists()


# -- the site core --------------------------------------------------------------------------


def site_core() -> SiteCore:
    settings = SiteSettings(node_id="00000000000000aa", site="s", address="10.0.0.1",
                            http_port=8080, can_answer_pxe=False, has_origin=True)  # fmt: skip
    core = SiteCore(settings, now=0.0, wall=NOW)
    core.catalog = Catalog(1, NOW, NOW + 86400, (
        CatalogEntry("a", "1", MID_A, priority=1), CatalogEntry("b", "1", MID_B, priority=2)))
    return core


def test_the_core_stops_wanting_a_paused_image_and_orders_by_the_priority_in_force() -> None:
    core = site_core()
    assert core.wanted_ids(0.0) == [MID_B, MID_A]
    assert core.control_accepted(control(7, ControlEntry("a", None, 5)), "k1", "origin")
    assert core.wanted_ids(0.0) == [MID_A, MID_B]
    assert core.control_accepted(control(8, ControlEntry("b", True, None)), "k1", "origin")
    assert core.wanted_ids(0.0) == [MID_A]
    core.overrides = {"a": ControlEntry("a", True, None)}
    assert core.wanted_ids(0.0) == []
    status = core.status(0.0, NOW)["control"]
    assert status["serial"] == 8 and status["signer"] == "k1" and status["state"] == "accepted"
    by_name = {i["name"]: i for i in status["images"]}
    assert by_name["a"]["paused_by"] == "site override"
    assert by_name["b"]["paused_by"] == "control serial 8"


def test_a_refusal_changes_nothing_and_shows_in_status_and_warnings() -> None:
    core = site_core()
    core.control_accepted(control(7, ControlEntry("a", True)), "k1", "origin")
    assert core.control_refused("origin", 9, "ee", "wrong role", "signed by enroll key ee")
    assert not core.control_refused("origin", 9, "ee", "wrong role", "again")  # counted once
    assert core.wanted_ids(0.0) == [MID_B]
    status = core.status(0.0, NOW)
    assert status["control"]["state"] == "refused"
    assert status["control"]["refused"]["reason"] == "wrong role"
    assert any("control document serial 9" in w and "wrong role" in w
               for w in status["warnings"])  # fmt: skip
    # A lower serial is never taken by the core either.
    assert not core.control_accepted(control(6, ControlEntry("a", False)), "k1", "origin")
    assert core.wanted_ids(0.0) == [MID_B]


def test_an_expired_control_document_stops_applying() -> None:
    core = site_core()
    core.control_accepted(control(7, ControlEntry("a", True), expires=NOW + 10), "k", "origin")
    assert core.wanted_ids(0.0) == [MID_B]
    status = core.status(0.0, NOW + 11)
    assert core.wanted_ids(0.0) == [MID_B, MID_A]
    assert status["control"]["applied"] is False
    assert any("expired" in w for w in status["warnings"])


def test_a_kept_document_no_key_vouches_for_bars_older_serials_but_does_not_apply() -> None:
    core = site_core()
    core.control, core.control_signer = control(7, ControlEntry("a", True)), None
    assert core.wanted_ids(0.0) == [MID_B, MID_A]
    status = core.status(0.0, NOW)
    assert status["control"]["state"] == "untrusted"
    assert any("no key trusted now" in w for w in status["warnings"])
    assert not core.control_accepted(control(6, ControlEntry("a", False)), "k", "origin")
    # The same document, signed by a key trusted again, applies.
    assert core.control_accepted(control(7, ControlEntry("a", True)), "k", "origin")
    assert core.wanted_ids(0.0) == [MID_B]


def test_a_peer_cut_off_from_the_origin_takes_the_control_document_from_a_peer() -> None:
    from dataclasses import replace

    from peer.core.site_core import FetchCatalog
    from peer.core.wire import Hello

    peer = "10.0.0.2:8080"
    same_serial = Hello("00000000000000bb", "s", "10.0.0.2", 8080, NOW, False, 1, True, {}, [])

    def from_peer(core: SiteCore, now: float) -> list[str]:
        # A hello with the catalog serial we hold: nothing new announced, yet the control
        # document may be new (hellos do not carry its serial).
        core.hello_received(peer, same_serial, now)
        return [c.source for c in core.tick(now, NOW) if isinstance(c, FetchCatalog)]

    core = site_core()
    core.settings = replace(core.settings, has_origin=False)
    assert from_peer(core, 1.0) == [peer]
    assert from_peer(core, 1.5) == []  # in flight
    core.catalog_fetch_done(2.0)
    assert from_peer(core, 3.0) == []  # once a poll interval
    assert from_peer(core, 16.0) == [peer]
    with_origin = site_core()
    assert from_peer(with_origin, 1.0) == ["origin"]  # the origin has it
