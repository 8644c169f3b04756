"""/metrics renders the status snapshot in the Prometheus text format."""

from __future__ import annotations

from peer.api.metrics import render_metrics


def test_counts_by_reason_become_labelled_counters_and_levels_become_gauges() -> None:
    text = render_metrics(
        {
            "dhcp": {"received": 7, "dropped": {"truncated": 2, 'we"ird\n': 1}},
            "tftp": {"active": 3, "bytes_sent": 10},
            "http": {"open": 4, "limits": {"per_client": 128}, "rejected": {"total_cap": 1}},
            "images": [{}, {}],
            "site": {
                "rejected": {"hello": {"non-finite number": 5}},
                "tasks": {"heartbeat": {"running": True, "failures": 2}},
                "reputation": {"0123456789abcdef": {"bad_chunks": 3, "shunned": True}},
                "peers": [{"self": True, "counters": {"wan_bytes": 99}}],
                "this_peer_responds": True,
                "warnings": ["x"],
            },
        }
    )
    lines = set(text.splitlines())
    assert "pxepeer_dhcp_received_total 7" in lines
    assert 'pxepeer_dhcp_dropped_total{reason="truncated"} 2' in lines
    assert 'pxepeer_dhcp_dropped_total{reason="we\\"ird\\n"} 1' in lines
    assert "pxepeer_tftp_active 3" in lines and "# TYPE pxepeer_tftp_active gauge" in lines
    assert "pxepeer_http_open 4" in lines
    assert not any("limits" in line for line in lines)
    assert 'pxepeer_rejected_total{input="hello",reason="non-finite number"} 5' in lines
    assert 'pxepeer_task_failures_total{task="heartbeat"} 2' in lines
    assert 'pxepeer_task_running{task="heartbeat"} 1' in lines
    assert 'pxepeer_peer_strikes_total{node="0123456789abcdef"} 3' in lines
    assert "pxepeer_wan_bytes_total 99" in lines
    assert "pxepeer_responder 1" in lines and "pxepeer_images 2" in lines
    # Each metric is declared once, before its samples.
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_rogue_pxe_servers_are_a_gauge_and_one_labelled_series_each() -> None:
    rogues = [
        {"mac": "02:66:00:00:00:01", "ip": "10.77.0.66", "offers": "boot file 'evil.kpxe'"},
        {"mac": "f6:75:e0:86:d7:a6", "ip": "10.77.0.2", "offers": "a PXE boot menu"},
    ]
    lines = render_metrics({"site": {"rogue_pxe_servers": rogues}}).splitlines()
    assert "# TYPE pxepeer_rogue_pxe_servers gauge" in lines
    assert "pxepeer_rogue_pxe_servers 2" in lines
    assert "# HELP pxepeer_rogue_pxe_server 1 for each rogue PXE server seen lately, " \
        "by its MAC and IP" in lines
    assert 'pxepeer_rogue_pxe_server{mac="02:66:00:00:00:01",ip="10.77.0.66"} 1' in lines
    assert 'pxepeer_rogue_pxe_server{mac="f6:75:e0:86:d7:a6",ip="10.77.0.2"} 1' in lines
    quiet = render_metrics({"site": {"rogue_pxe_servers": []}}).splitlines()
    assert "pxepeer_rogue_pxe_servers 0" in quiet
    assert not any(line.startswith("pxepeer_rogue_pxe_server{") for line in quiet)
