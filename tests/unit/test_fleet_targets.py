"""`pxepeer fleet targets` and `pxepeer status --url/--token/--site-wide` against fake peers
on 127.0.0.1 (http.server threads serving status documents we write), and the pure
inventory/answer/merge decisions of peer/core/fleet_targets.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from peer.cli import main
from peer.core.fleet_targets import (
    BadAnswer,
    FleetInputError,
    Site,
    SiteResult,
    merge,
    parse_inventory,
    read_previous,
    status_targets,
)
from peer.remote_status import StatusError, fetch_status

TOKEN = "pxp_viewer_token"


class FakePeer:
    """A peer's /v1/status, served on 127.0.0.1: `body` is what it answers (bytes), and
    with `token` set, a request without that bearer token gets 401 (a wrong one 403)."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.token: str | None = None
        self.code = 200
        self.paths: list[str] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                code, body = peer.code, peer.body
                if peer.token and auth is None:
                    code, body = 401, b"401: Unauthorized"
                elif peer.token and auth != f"Bearer {peer.token}":
                    code, body = 403, b"403: Forbidden"
                peer.paths.append(self.path)
                if self.path.endswith("/v1/status") and code == 200:
                    self.send_response(200)
                else:
                    self.send_response(code if code != 200 else 404)
                if 300 <= code < 400:
                    self.send_header("Location", f"http://127.0.0.1:{peer.port}/elsewhere")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def serve(self, doc: object) -> None:
        self.body = json.dumps(doc).encode()


def status_doc(node: str, site: str, port: int, others: list[tuple[str, int]],
               images: dict[str, int] | None = None,
               warnings: list[str] | None = None) -> dict:  # fmt: skip
    peers = [{"node_id": node, "self": True, "address": "-", "http_port": port,
              "counters": {"wan_bytes": 6 << 20, "lan_bytes_in": 0, "lan_bytes_out": 1 << 20}}]
    peers += [{"node_id": f"n{p}", "self": False, "address": a, "http_port": p}
              for a, p in others]  # fmt: skip
    return {
        "site": {
            "site": site,
            "node_id": node,
            "this_peer_responds": node == "na",
            "peers": peers,
            "images": [{"name": "demo", "version": "1", "manifest_id": "ab" * 32,
                        "in_catalog": True, "chunks": {node: [have, 4]}}
                       for have in ([] if images is None else [images.get("demo", 0)])],
            "warnings": warnings or [],
        }
    }  # fmt: skip


@pytest.fixture
def fake_peers() -> Iterator[list[FakePeer]]:
    peers = [FakePeer() for _ in range(3)]
    yield peers
    for p in peers:
        p.server.shutdown()
        p.server.server_close()


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env or {"PXEPEER_TOKEN": ""})


# -- the inventory -------------------------------------------------------------------------


def test_inventory_names_sites_with_known_peer_urls_and_optional_labels() -> None:
    sites = parse_inventory(
        '[sites.store-12]\npeers = ["http://10.12.0.5:8080/", "http://10.12.0.6:8080"]\n'
        '[sites."store-40"]\npeers = ["https://[fd00::5]:8443"]\nlabels = {region = "north"}\n'
    )
    assert sites == [
        Site("store-12", ("http://10.12.0.5:8080", "http://10.12.0.6:8080")),
        Site("store-40", ("https://[fd00::5]:8443",), {"region": "north"}),
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sites = 1", "no sites"),
        ("[sites.a]\npeers = []", "bad peers"),
        ('[sites.a]\npeers = ["ftp://x"]', "bad url"),
        ('[sites.a]\npeers = ["http://x:8080/v1/status"]', "bad url"),
        ('[sites.a]\npeers = ["http://x:99999"]', "bad url"),
        ('[sites."a b"]\npeers = ["http://x:1"]', "bad site name"),
        ('[sites.a]\npeers = ["http://x:1"]\nlabels = {site = "b"}', "bad labels"),
        ('[sites.a]\npeers = ["http://x:1"]\nlabels = {__x = "b"}', "bad labels"),
        ('[sites.a]\npeers = ["http://x:1"]\nspeers = 1', "unknown key"),
        ("[sites.a", "bad toml"),
    ],
)
def test_a_bad_inventory_is_refused_by_reason(text: str, reason: str) -> None:
    with pytest.raises(FleetInputError) as err:
        parse_inventory(text)
    assert err.value.reason == reason


# -- answers are hostile ----------------------------------------------------------------------


def test_targets_are_the_asked_url_and_each_listed_peers_ip_and_port() -> None:
    doc = status_doc("a", "s", 8080, [("10.0.0.7", 8081), ("fd00::7", 8082)])
    targets, skipped = status_targets(doc, "http://peer-a.example:8080")
    assert targets == ["10.0.0.7:8081", "[fd00::7]:8082", "peer-a.example:8080"]
    assert skipped == []


def test_names_loopback_unspecified_and_bad_ports_in_an_answer_are_skipped_and_said() -> None:
    doc = status_doc("a", "s", 8080, [("10.0.0.7", 8081)])
    doc["site"]["peers"] += [
        {"address": "evil.example", "http_port": 80},
        {"address": "127.0.0.1", "http_port": 80},  # asked over the network: not loopback
        {"address": "0.0.0.0", "http_port": 80},
        {"address": "10.0.0.8", "http_port": True},
        {"address": "10.0.0.9", "http_port": 70000},
        "junk",
    ]
    targets, skipped = status_targets(doc, "http://10.0.0.6:8080")
    assert targets == ["10.0.0.6:8080", "10.0.0.7:8081"]
    assert [s.split(":")[0] for s in skipped] == [
        "bad address", "bad address", "bad address", "bad port", "bad port", "bad peer entry"
    ]  # fmt: skip


def test_an_answer_that_is_no_status_document_gives_no_targets() -> None:
    for doc in ([], {"site": []}, {"site": {"peers": "x"}}):
        with pytest.raises(BadAnswer):
            status_targets(doc, "http://10.0.0.6:8080")


def test_a_failed_site_keeps_its_previous_targets_and_a_dropped_site_goes() -> None:
    previous = read_previous(json.dumps([
        {"targets": ["10.0.0.1:8080"], "labels": {"site": "a"}},
        {"targets": ["10.0.0.9:8080"], "labels": {"site": "gone"}},
        {"targets": "junk", "labels": {"site": "b"}},
    ]).encode())  # fmt: skip
    a, b, c = Site("a", ("http://x:1",)), Site("b", ("http://y:1",)), Site("c", ("http://z:1",))
    groups, notes = merge(
        [SiteResult(a, None, "down"), SiteResult(b, None, "down"), SiteResult(c, ["1.2.3.4:1"])],
        previous,
    )
    assert groups == [
        {"targets": ["10.0.0.1:8080"], "labels": {"site": "a"}},
        {"targets": ["1.2.3.4:1"], "labels": {"site": "c"}},
    ]
    assert notes == [
        "site a: down; keeping its 1 previous target(s)",
        "site b: down; no previous targets",
    ]
    assert read_previous(b"[1e999]") == {} and read_previous(b"\xff") == {}


def test_fetch_refuses_oversized_non_json_and_non_finite_answers(fake_peers) -> None:
    peer = fake_peers[0]
    for body, reason in ((b'{"site": {}, "x": NaN}', "bad json"), (b"[]", "not a status"),
                         (b"x" * 2000, "too big")):  # fmt: skip
        peer.body = body
        with pytest.raises(StatusError) as err:
            fetch_status(peer.url, max_bytes=1000)
        assert err.value.reason == reason


def test_a_redirect_is_not_followed_so_the_token_goes_nowhere_else(fake_peers) -> None:
    peer = fake_peers[0]
    peer.code = 302
    with pytest.raises(StatusError) as err:
        fetch_status(peer.url, token=TOKEN)
    assert err.value.code == 302 and peer.paths == ["/v1/status"]


# -- pxepeer fleet targets ------------------------------------------------------------------


def test_fleet_targets_writes_file_sd_of_every_live_peer_by_site(
    fake_peers, tmp_path: Path
) -> None:
    a, b, c = fake_peers
    # Site one: a lists b (loopback is fine: a was asked on loopback). Site two: c alone.
    a.serve(status_doc("na", "one", a.port, [("127.0.0.1", b.port)]))
    c.serve(status_doc("nc", "two", c.port, []))
    for p in (a, c):
        p.token = TOKEN
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        f'[sites.one]\npeers = ["http://127.0.0.1:1", "{a.url}"]\n'  # the first is down
        f'[sites.two]\npeers = ["{c.url}"]\nlabels = {{region = "north"}}\n'
    )
    token_file = tmp_path / "viewer.token"
    token_file.write_text(TOKEN + "\n")
    out = tmp_path / "sd" / "pxepeer.json"
    result = run("fleet", "targets", "--inventory", str(inventory), "--out", str(out),
                 "--token-file", str(token_file))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == [
        {"targets": sorted([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]),
         "labels": {"site": "one"}},
        {"targets": [f"127.0.0.1:{c.port}"], "labels": {"site": "two", "region": "north"}},
    ]  # fmt: skip

    # Site two stops answering (its token is revoked): it keeps its targets, exit 1.
    c.token = "another"
    result = run("fleet", "targets", "--inventory", str(inventory), "--out", str(out),
                 "--token", TOKEN)  # fmt: skip
    assert result.exit_code == 1
    assert "site two: no known peer answered" in result.stderr
    assert "403" in result.stderr and "keeping its 1 previous target(s)" in result.stderr
    assert json.loads(out.read_text())[1]["targets"] == [f"127.0.0.1:{c.port}"]


def test_fleet_targets_bad_input_is_one_line_and_exit_2_and_writes_nothing(
    tmp_path: Path,
) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('[sites.one]\npeers = ["http://127.0.0.1:1/x"]\n')
    out = tmp_path / "out.json"
    for args in (
        ["--inventory", str(inventory)],
        ["--inventory", str(tmp_path / "missing.toml")],
        ["--inventory", str(inventory), "--token", "a", "--token-file", str(inventory)],
    ):
        result = run("fleet", "targets", "--out", str(out), *args)
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


# -- pxepeer status --url --token, --site-wide ---------------------------------------------


def test_status_of_a_remote_peer_with_a_token_and_refusals_are_one_line_exit_2(
    fake_peers,
) -> None:
    a = fake_peers[0]
    a.serve(status_doc("na", "one", a.port, [], images={"demo": 4}))
    a.token = TOKEN
    result = run("status", "--url", a.url, env={"PXEPEER_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "site one" in result.stdout
    # Behind a reverse proxy's path prefix too (one peer; --site-wide wants addresses).
    result = run("status", "--url", a.url + "/pxepeer/", env={"PXEPEER_TOKEN": TOKEN})
    assert result.exit_code == 0 and a.paths[-1] == "/pxepeer/v1/status"
    for env in ({"PXEPEER_TOKEN": ""}, {"PXEPEER_TOKEN": "wrong"}):
        result = run("status", "--url", a.url, env=env)
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and ("401" in lines[0] or "403" in lines[0]), lines


def test_site_wide_status_is_one_row_per_peer_from_its_own_answer(fake_peers) -> None:
    a, b, c = fake_peers
    silent = c.port
    c.server.shutdown()
    c.server.server_close()  # listed by a, but answers nothing
    a.serve(status_doc("na", "one", a.port, [("127.0.0.1", b.port), ("127.0.0.1", silent)],
                       images={"demo": 4}))  # fmt: skip
    nb = f"n{b.port}"  # the name a lists it by
    b.serve(status_doc(nb, "one", b.port, [("127.0.0.1", a.port)], images={"demo": 1},
                       warnings=["catalog expired\x1b[31m"]))  # fmt: skip
    result = run("status", "--url", a.url, "--site-wide")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1] == "n"}
    assert "yes" in rows["na"] and "100.0%" in rows["na"] and "6.0 MiB" in rows["na"]
    assert "25.0%" in rows[nb] and rows[nb].rstrip().endswith("1")
    assert f"n{silent}" in rows and "not answering: unreachable" in rows[f"n{silent}"]
    assert "1 not answering" in result.stdout
    assert f"WARNING {nb}: catalog expired?[31m" in result.stdout  # no escape reaches the tty
    as_json = json.loads(run("status", "--url", a.url, "--site-wide", "--json").stdout)
    assert [r["node_id"] for r in as_json] == ["na", nb, f"n{silent}"]
    assert as_json[2]["status"] is None and as_json[2]["error"]
