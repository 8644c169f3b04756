"""`pxepeer status --site-wide`: one site in one table, from every live peer's own status.

`pxepeer status` shows the site as one peer sees it; what that peer says of the others
(their counters, their holdings) is hearsay from hellos. Site-wide asks the peer given,
then each live peer it lists (at once, each bounded by peer/remote_status.py), and prints
one row per peer from the peer's own answer: responder, WAN/LAN bytes, each image's
completeness, warnings. A peer listed but not answering gets a row that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from peer.core.fleet_targets import BadAnswer, asked_target, is_loopback_url, peer_target
from peer.remote_status import StatusError, fetch_status

MIB = 1024 * 1024
WORKERS = 16
# A store has a handful of peers; a listing longer than this is not worth an hour.
MAX_PEERS = 256


@dataclass
class PeerView:
    """One row: a peer the asked peer lists, and its own status or why there is none."""

    node_id: str
    target: str  # HOST:PORT
    status: dict | None
    error: str = ""
    asked: bool = False


def gather(base: str, token: str | None, timeout: float = 5.0) -> list[PeerView]:
    """The asked peer first, then every live peer it lists. StatusError when the asked
    peer itself does not answer (there is no site to show)."""
    first = fetch_status(base, token, timeout)
    site = first["site"]
    rows = [PeerView(_text(site.get("node_id")), asked_target(base), first, asked=True)]
    scheme = urlsplit(base).scheme
    on_loopback = is_loopback_url(base)
    pending: list[PeerView] = []
    seen = {rows[0].target}
    peers = site.get("peers")
    others = [p for p in peers if isinstance(p, Mapping) and p.get("self") is not True] if (
        isinstance(peers, list)) else []  # fmt: skip
    for peer in others[:MAX_PEERS]:
        node = _text(peer.get("node_id"))
        try:
            target = peer_target(peer, on_loopback)
        except BadAnswer as exc:
            rows.append(PeerView(node, "-", None, f"listed with a {exc.reason}"))
            continue
        if target not in seen:  # a peer listed twice is asked once
            seen.add(target)
            pending.append(PeerView(node, target, None))

    def ask(view: PeerView) -> PeerView:
        try:
            view.status = fetch_status(f"{scheme}://{view.target}", token, timeout)
        except StatusError as exc:
            view.error = f"not answering: {exc.reason}" + (f" {exc.code}" if exc.code else "")
        return view

    if pending:
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(pending))) as pool:
            rows.extend(pool.map(ask, pending))
    if len(others) > MAX_PEERS:
        rows.append(PeerView("...", "-", None, f"{len(others) - MAX_PEERS} more not asked"))
    return rows


def _text(value: object, width: int = 200) -> str:
    """A string from a peer's answer, safe to print on a terminal."""
    text = value if isinstance(value, str) else "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)[:width]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _own(status: Mapping) -> tuple[Mapping, dict[str, str]]:
    """(this peer's own entry of site.peers, {"name version": "pct%"} of its images)."""
    site = status.get("site") or {}
    node = site.get("node_id")
    peers = site.get("peers") if isinstance(site.get("peers"), list) else []
    mine = next((p for p in peers if isinstance(p, Mapping) and p.get("self") is True), {})
    images: dict[str, str] = {}
    listed = site.get("images") if isinstance(site.get("images"), list) else []
    for image in listed:
        if not isinstance(image, Mapping) or not isinstance(image.get("chunks"), Mapping):
            continue
        pair = image["chunks"].get(node)
        if isinstance(pair, list) and len(pair) == 2:
            have, total = _int(pair[0]), _int(pair[1])
            pct = 100.0 * have / total if total else 100.0
            images[_text(f"{image.get('name')} {image.get('version')}", 40)] = f"{pct:.1f}%"
    return mine, images


def render_site(rows: list[PeerView]) -> str:
    first = rows[0].status or {}
    site = first.get("site") or {}
    owns = {id(r): _own(r.status) for r in rows if r.status is not None}
    images = sorted({name for _, imgs in owns.values() for name in imgs})
    silent = sum(1 for r in rows if r.status is None)
    lines = [
        f"site {_text(site.get('site'))}: {len(rows)} peer(s)"
        + (f", {silent} not answering" if silent else "")
        + f"  (as {rows[0].node_id} at {rows[0].target} sees it)"
    ]
    head = f"{'PEER':<20}{'ADDRESS':<23}{'RESPONDER':<11}"
    head += f"{'WAN IN':>12}{'LAN IN':>12}{'LAN OUT':>12}"
    head += "".join(f"  {name:>14}" for name in images) + "  WARNINGS"
    lines.append(head)
    warnings: list[str] = []
    for row in rows:
        name = row.node_id[:18] + (" *" if row.asked else "")
        line = f"{name:<20}{row.target:<23}"
        if row.status is None:
            lines.append(line + row.error)
            continue
        mine, held = owns[id(row)]
        rsite = row.status.get("site") or {}
        counters = mine.get("counters") if isinstance(mine.get("counters"), Mapping) else {}
        responder = "yes" if rsite.get("this_peer_responds") is True else "-"
        line += (
            f"{responder:<11}{_mib(_int(counters.get('wan_bytes'))):>12}"
            f"{_mib(_int(counters.get('lan_bytes_in'))):>12}"
            f"{_mib(_int(counters.get('lan_bytes_out'))):>12}"
        )
        line += "".join(f"  {held.get(name, '-'):>14}" for name in images)
        said = rsite.get("warnings") if isinstance(rsite.get("warnings"), list) else []
        line += f"  {len(said)}"
        warnings.extend(f"{row.node_id[:18]}: {_text(w)}" for w in said[:20])
        lines.append(line)
    if images:
        lines.append("(image columns: the share of the image's chunks each peer holds)")
    if warnings:
        lines.append("")
        lines.extend(f"WARNING {w}" for w in warnings)
    return "\n".join(lines)


def as_json(rows: list[PeerView]) -> list[dict[str, object]]:
    return [
        {"node_id": r.node_id, "target": r.target, "asked": r.asked,
         "status": r.status, "error": r.error or None}
        for r in rows
    ]  # fmt: skip
