"""The fleet's scrape targets: which peers of which sites Prometheus should scrape.

Pure decisions for `pxepeer fleet targets` (peer/fleet_cli.py does the I/O): read the
operator's inventory (sites, each with a few known peer URLs), turn one peer's status
answer into the site's live peers, and merge this run's answers with the targets the last
run wrote, so a site whose peers cannot be reached this time keeps what it had (a store
whose WAN link is down for an hour must not vanish from the fleet view; its `up` series
going to 0 is what tells the operator).

Status answers come from the network and are treated as hostile: only IP literals and
integer ports are accepted (a peer cannot make Prometheus scrape a host name it chose),
loopback addresses only from a peer that was itself asked on loopback, and at most
MAX_PEERS_PER_SITE targets per site.

The output is Prometheus' file-based service discovery format:
`[{"targets": ["10.1.2.3:8080", ...], "labels": {"site": "store-12", ...}}, ...]`.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from urllib.parse import urlsplit

from imaging.strict_json import StrictJsonError, loads

MAX_PEERS_PER_SITE = 1024
MAX_KNOWN_PEERS = 16
MAX_INVENTORY_BYTES = 4 << 20
MAX_PREVIOUS_BYTES = 64 << 20
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Prometheus label names; `__` is reserved for Prometheus' own.
LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_LABELS = frozenset({"site", "instance", "job"})


class FleetInputError(ValueError):
    """The inventory (or an option) is unusable; `reason` is short and fixed."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class BadAnswer(ValueError):
    """A peer's status answer is not one we can take targets from."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Site:
    name: str
    peers: tuple[str, ...]  # base URLs, http(s)://HOST:PORT, tried in order
    labels: Mapping[str, str] = field(default_factory=dict)


def base_url(url: str, allow_path: bool = False) -> str:
    """`url` as http(s)://HOST[:PORT] (and, with `allow_path`, a path prefix such as a
    reverse proxy's, without its trailing slash); ValueError when it is anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: want http://PEER:PORT")
    path = parts.path.rstrip("/") if allow_path else parts.path.strip("/")
    if parts.query or parts.fragment or parts.username or (path and not allow_path):
        raise ValueError(f"{url!r}: want the peer's address only, e.g. http://PEER:8080")
    try:
        parts.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    return f"{parts.scheme}://{parts.netloc}{path if allow_path else ''}"


def parse_inventory(text: str) -> list[Site]:
    """The inventory, TOML:

        [sites.store-12]
        peers = ["http://10.12.0.5:8080", "http://10.12.0.6:8080"]
        labels = { region = "north" }     # optional, added to every target of the site
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetInputError("bad toml", f"inventory: {exc}") from None
    unknown = set(doc) - {"sites"}
    if unknown:
        raise FleetInputError("unknown key", f"inventory: unknown key {sorted(unknown)[0]!r}")
    sites = doc.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise FleetInputError("no sites", "inventory: no [sites.NAME] table")
    out = []
    for name, entry in sites.items():
        where = f"inventory: site {name!r}"
        if not SITE_NAME.match(name):
            raise FleetInputError("bad site name", f"{where}: want letters, digits, . _ -")
        if not isinstance(entry, dict):
            raise FleetInputError("bad site", f"{where}: want a table")
        extra = set(entry) - {"peers", "labels"}
        if extra:
            raise FleetInputError("unknown key", f"{where}: unknown key {sorted(extra)[0]!r}")
        peers = entry.get("peers")
        if not isinstance(peers, list) or not peers or len(peers) > MAX_KNOWN_PEERS:
            raise FleetInputError(
                "bad peers", f"{where}: peers must list 1 to {MAX_KNOWN_PEERS} URLs"
            )
        urls = []
        for url in peers:
            if not isinstance(url, str):
                raise FleetInputError("bad peers", f"{where}: peers must be strings")
            try:
                urls.append(base_url(url))
            except ValueError as exc:
                raise FleetInputError("bad url", f"{where}: {exc}") from None
        labels = entry.get("labels", {})
        if not isinstance(labels, dict):
            raise FleetInputError("bad labels", f"{where}: labels must be a table")
        for key, value in labels.items():
            if not LABEL_NAME.match(key) or key.startswith("__") or key in RESERVED_LABELS:
                raise FleetInputError("bad labels", f"{where}: label name {key!r} not allowed")
            if not isinstance(value, str) or len(value) > 256:
                raise FleetInputError("bad labels", f"{where}: label {key!r} must be a string")
        out.append(Site(name, tuple(urls), dict(labels)))
    return out


def _host_port(address: str, port: int) -> str:
    ip = ip_address(address)
    return f"[{ip}]:{port}" if isinstance(ip, IPv6Address) else f"{ip}:{port}"


def asked_target(base: str) -> str:
    """The scrape target of the peer asked at `base` (its URL is known to work)."""
    parts = urlsplit(base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        return _host_port(host, port)
    except ValueError:
        return f"{host}:{port}"  # a name the operator wrote in the inventory


def is_loopback_url(base: str) -> bool:
    try:
        return ip_address(urlsplit(base).hostname or "").is_loopback
    except ValueError:
        return urlsplit(base).hostname == "localhost"


def peer_target(peer: object, asked_on_loopback: bool) -> str:
    """`address:http_port` of one entry of a status document's site.peers."""
    if not isinstance(peer, Mapping):
        raise BadAnswer("bad peer entry")
    address, port = peer.get("address"), peer.get("http_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise BadAnswer("bad port", repr(port)[:40])
    if not isinstance(address, str) or len(address) > 64:
        raise BadAnswer("bad address")
    try:
        ip = ip_address(address)
    except ValueError:
        raise BadAnswer("bad address", repr(address)[:40]) from None
    if ip.is_unspecified or ip.is_multicast or (ip.is_loopback and not asked_on_loopback):
        raise BadAnswer("bad address", str(ip))
    return _host_port(address, port)


def status_targets(status: object, asked: str) -> tuple[list[str], list[str]]:
    """(targets, skipped-entry reasons) of the live peers one peer's /v1/status shows.

    The asked peer itself is its inventory URL's address (its own entry may say "-" or
    the PXE interface's address, which the monitoring host may not reach). Other entries
    with a bad address or port are skipped and named, not fatal: one odd hello must not
    hide the rest of the site.
    """
    if not isinstance(status, Mapping) or not isinstance(status.get("site"), Mapping):
        raise BadAnswer("not a status document")
    peers = status["site"].get("peers")
    if not isinstance(peers, list):
        raise BadAnswer("no peer list")
    if len(peers) > MAX_PEERS_PER_SITE:
        raise BadAnswer("too many peers", str(len(peers)))
    on_loopback = is_loopback_url(asked)
    targets = {asked_target(asked)}
    skipped = []
    for peer in peers:
        if isinstance(peer, Mapping) and peer.get("self") is True:
            continue
        try:
            targets.add(peer_target(peer, on_loopback))
        except BadAnswer as exc:
            skipped.append(str(exc))
    return sorted(targets), skipped


def read_previous(data: bytes) -> dict[str, dict[str, object]]:
    """The groups a previous run wrote, by site label; anything malformed is dropped (the
    file is ours, but it may have been edited or truncated by hand)."""
    try:
        doc = loads(data, MAX_PREVIOUS_BYTES)
    except StrictJsonError:
        return {}
    out: dict[str, dict[str, object]] = {}
    for group in doc if isinstance(doc, list) else ():
        if not isinstance(group, Mapping):
            continue
        targets, labels = group.get("targets"), group.get("labels")
        if not (isinstance(targets, list) and isinstance(labels, Mapping)):
            continue
        site = labels.get("site")
        if isinstance(site, str) and all(isinstance(t, str) for t in targets):
            out[site] = {"targets": list(targets), "labels": dict(labels)}
    return out


@dataclass(frozen=True)
class SiteResult:
    """One site this run: its targets, or why none of its known peers answered."""

    site: Site
    targets: list[str] | None
    failure: str = ""


def merge(
    results: list[SiteResult], previous: Mapping[str, Mapping[str, object]]
) -> tuple[list[dict[str, object]], list[str]]:
    """(file_sd groups, notes for stderr). A site that failed keeps its previous targets;
    sites no longer in the inventory are dropped."""
    groups: list[dict[str, object]] = []
    notes = []
    for result in results:
        labels = {"site": result.site.name, **result.site.labels}
        if result.targets is not None:
            groups.append({"targets": result.targets, "labels": labels})
            continue
        kept = previous.get(result.site.name)
        kept_targets = list(kept["targets"]) if kept else []  # type: ignore[call-overload]
        if kept_targets:
            groups.append({"targets": kept_targets, "labels": labels})
            notes.append(
                f"site {result.site.name}: {result.failure}; "
                f"keeping its {len(kept_targets)} previous target(s)"
            )
        else:
            notes.append(f"site {result.site.name}: {result.failure}; no previous targets")
    return groups, notes


def render(groups: list[dict[str, object]]) -> bytes:
    return (json.dumps(groups, indent=1, sort_keys=True) + "\n").encode()
