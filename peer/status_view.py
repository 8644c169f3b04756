"""`pxepeer status`: render a peer's /v1/status (peer/remote_status.py fetches it) for a
terminal."""

from __future__ import annotations

import time

MIB = 1024 * 1024


def _mib(n: int | None) -> str:
    return f"{(n or 0) / MIB:.1f} MiB"


def _rejected_lines(doc: dict) -> list[str]:
    """Inputs refused, one line per kind: what an admin looks at when a host misbehaves."""
    counts: dict[str, dict[str, int]] = {}
    for kind, reasons in ((doc.get("site") or {}).get("rejected") or {}).items():
        counts.setdefault(kind, {}).update(reasons)
    for server in ("dhcp", "tftp"):
        dropped = (doc.get(server) or {}).get("dropped") or {}
        if dropped:
            counts.setdefault(f"{server} packets", {}).update(dropped)
    http = doc.get("http") or {}
    for key in ("rejected", "closed"):
        if isinstance(http.get(key), dict) and http[key]:
            counts.setdefault(f"http connections {key}", {}).update(http[key])
    lines = []
    for kind, reasons in sorted(counts.items()):
        reasons = {r: n for r, n in reasons.items() if isinstance(n, int) and n}
        if not reasons:
            continue
        total = sum(reasons.values())
        top = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:4])
        lines.append(f"refused {kind}: {total} ({top})")
    return lines


def _rate_lines(doc: dict) -> list[str]:
    """--wan-rate and --lan-rate: the cap now, and the schedule when there is one."""
    out = []
    limits = doc.get("rate_limits") or {}
    for key, label in (("wan", "WAN rate (origin downloads)"), ("lan", "LAN rate (serving)")):
        limit = limits.get(key)
        if not isinstance(limit, dict):
            continue
        line = f"{label}: {limit.get('rate_text')}"
        if limit.get("next_change"):
            line += f" until {limit['next_change']}, then {limit.get('next_rate_text')}"
        if "," in str(limit.get("schedule")):
            line += f"  (schedule: {limit.get('schedule')})"
        out.append(line)
    return out


def _control_lines(control: object) -> list[str]:
    """The control document followed or refused, and each image whose paused flag or
    priority does not come from the catalog (peer/core/site_core.py control_status)."""
    if not isinstance(control, dict):
        return []
    lines = []
    if control.get("serial") is not None:
        applied = (
            "" if control.get("applied")
            else "  EXPIRED (catalog applies)" if control.get("signer")
            else "  NOT APPLIED (signer not trusted)"
        )  # fmt: skip
        lines.append(f"control: serial {control['serial']} signed by key "
                     f"{control.get('signer') or '-'}{applied}")  # fmt: skip
    refused = control.get("refused")
    if isinstance(refused, dict):
        lines.append(f"control REFUSED: serial {refused.get('serial')} from "
                     f"{refused.get('source')} by key {refused.get('signer') or 'none'}: "
                     f"{refused.get('reason')}")  # fmt: skip
    for image in control.get("images") or []:
        if not isinstance(image, dict):
            continue
        by = (image.get("paused_by"), image.get("priority_by"))
        if by == ("catalog", "catalog"):
            continue
        lines.append(f"  {image.get('name')}: {'paused' if image.get('paused') else 'active'} "
                     f"({by[0]}), priority {image.get('priority')} ({by[1]})")  # fmt: skip
    return lines


def render_status(doc: dict) -> str:
    site = doc.get("site") or {}
    lines = [
        f"site {site.get('site')}  this peer {site.get('node_id')}  "
        f"interface {doc.get('interface') or '-'} ({doc.get('address') or 'no PXE'})",
        f"PXE responder: {', '.join(site.get('responders') or []) or 'none'}"
        + ("  (this peer)" if site.get("this_peer_responds") else ""),
    ]
    membership = site.get("membership") or {}
    if membership.get("mode") == "site of one":
        lines.append("membership: site of one (no enroll key trusted: no peer protocol)")
    elif membership:
        refused = sum((membership.get("refused") or {}).values())
        lines.append(
            f"membership: enrolled as {membership.get('label') or '-'} by enroll key "
            f"{membership.get('issuer')}; {refused} peer request(s) refused"
        )
    catalog = site.get("catalog")
    lines.append(
        f"catalog: serial {catalog['serial']}{'  EXPIRED' if catalog['expired'] else ''}"
        if catalog
        else "catalog: none"
    )
    lines.extend(_control_lines(site.get("control")))
    lines.extend(_rate_lines(doc))
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
            by = image.get("paused_by")
            flags.append(f"paused by {by}" if by and by != "catalog" else "paused")
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
    strikes = {
        node: r for node, r in (site.get("reputation") or {}).items() if r.get("bad_chunks")
    }
    if strikes:
        lines.append("")
        for node, r in sorted(strikes.items()):
            lines.append(
                f"strikes against {node}: {r['bad_chunks']}"
                + ("  (shunned)" if r.get("shunned") else "")
            )
    rejected = _rejected_lines(doc)
    if rejected:
        lines.append("")
        lines.extend(rejected)
    rogues = [r for r in site.get("rogue_pxe_servers") or [] if isinstance(r, dict)]
    if rogues:
        lines.append("")
        lines.append(f"{'ROGUE PXE SERVER':<19}{'IP':<17}{'KIND':<7}{'FIRST SEEN':<21}OFFERS")
        for r in rogues:
            first = r.get("first_seen")
            when = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first))
                if isinstance(first, (int, float))
                else "-"
            )
            kind = "dhcp" if r.get("full_dhcp") else "proxy"
            lines.append(
                f"{r.get('mac')!s:<19}{r.get('ip')!s:<17}{kind:<7}{when:<21}{r.get('offers')}"
            )
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
