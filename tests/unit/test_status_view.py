"""`pxepeer status` renders what /v1/status says, rogue PXE servers included."""

from __future__ import annotations

from peer.status_view import render_status


def test_rogue_pxe_servers_are_listed_and_their_warning_shown() -> None:
    warning = (
        "rogue PXE server 02:66:00:00:00:01 at 10.77.0.66 offers boot file 'evil.kpxe' "
        "(DHCP server; not a member of this site): machines that hear it first boot what it says"
    )
    doc = {
        "site": {
            "site": "10.77.0.0/24", "node_id": "00000000000000aa", "responders": [],
            "peers": [], "images": [], "warnings": [warning],
            "rogue_pxe_servers": [
                {"mac": "02:66:00:00:00:01", "ip": "10.77.0.66", "server_id": "10.77.0.66",
                 "offers": "boot file 'evil.kpxe'", "full_dhcp": True,
                 "first_seen": 1.8e9, "last_seen": 1.8e9 + 10},
            ],
        }
    }  # fmt: skip
    text = render_status(doc)
    [row] = [line for line in text.splitlines() if line.startswith("02:66:00:00:00:01")]
    assert "10.77.0.66" in row and "dhcp" in row and "evil.kpxe" in row
    assert f"WARNING: {warning}" in text.splitlines()


def test_status_without_rogues_has_no_rogue_section() -> None:
    doc = {"site": {"site": "s", "node_id": "n", "peers": [], "images": [], "warnings": []}}
    assert "ROGUE" not in render_status(doc)
