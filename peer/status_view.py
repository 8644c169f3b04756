"""`pxepeer status`: fetch a peer's /v1/status and render the site for a terminal."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

MIB = 1024 * 1024


class StatusUnavailable(Exception):
    pass


def fetch_status(url: str, timeout: float = 5.0) -> dict:
    target = url.rstrip("/") + "/v1/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(f"cannot read {target}: {reason}") from None


def _mib(n: int | None) -> str:
    return f"{(n or 0) / MIB:.1f} MiB"


def render_status(doc: dict) -> str:
    site = doc.get("site") or {}
    lines = [
        f"site {site.get('site')}  this peer {site.get('node_id')}  "
        f"interface {doc.get('interface') or '-'} ({doc.get('address') or 'no PXE'})",
        f"PXE responder: {', '.join(site.get('responders') or []) or 'none'}"
        + ("  (this peer)" if site.get("this_peer_responds") else ""),
    ]
    catalog = site.get("catalog")
    lines.append(
        f"catalog: serial {catalog['serial']}{'  EXPIRED' if catalog['expired'] else ''}"
        if catalog
        else "catalog: none"
    )
    lines.append("")
    lines.append(
        f"{'PEER':<18}{'ADDRESS':<22}{'ROLE':<11}{'WAN IN':>12}{'LAN IN':>12}{'LAN OUT':>12}"
    )
    for peer in site.get("peers", []):
        c = peer.get("counters") or {}
        role = "responder" if peer.get("responder") else "peer"
        name = peer["node_id"] + (" *" if peer.get("self") else "")
        addr = f"{peer.get('address')}:{peer.get('http_port')}"
        lines.append(
            f"{name:<18}{addr:<22}{role:<11}{_mib(c.get('wan_bytes')):>12}"
            f"{_mib(c.get('lan_bytes_in')):>12}{_mib(c.get('lan_bytes_out')):>12}"
        )
    lines.append("")
    for image in site.get("images", []):
        flags = []
        if image.get("paused"):
            flags.append("paused")
        if image.get("priority"):
            flags.append(f"priority {image['priority']}")
        if not image.get("in_catalog"):
            flags.append("local only")
        lines.append(
            f"image {image['name']} {image['version']} ({image['manifest_id'][:12]})"
            + (f"  [{', '.join(flags)}]" if flags else "")
        )
        for node, (have, total) in sorted(image.get("chunks", {}).items()):
            pct = 100.0 * have / total if total else 100.0
            lines.append(f"  {node:<18}{have:>6}/{total:<6} chunks  {pct:5.1f}%")
    for warning in site.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    jobs = doc.get("imaging") or []
    if jobs:
        lines.append("")
        for job in jobs:
            lines.append(
                "imaging "
                + "  ".join(
                    f"{k}={job[k]}"
                    for k in ("mac", "image", "state", "chunks_done", "chunks_total")
                    if k in job
                )
            )
    machines = doc.get("machines") or []
    if machines:
        lines.append("")
        lines.append(f"{len(machines)} machine(s) seen booting; see --json for stages")
    return "\n".join(lines)
