"""The hooks pxe/ offers the daemon's metrics: plain callables, no Prometheus in pxe/."""

from __future__ import annotations

from pxe.dhcp import DhcpMode
from pxe.dhcp_server import DhcpResponder, _Endpoint
from pxe.tftp_server import TftpEvent, TftpEventKind
from tests.unit.test_dhcp import TARGETS, _discover, _FakeTransport


def test_dhcp_reply_hook_gets_the_latency_of_each_reply_sent_and_nothing_for_drops() -> None:
    latencies: list[float] = []
    responder = DhcpResponder("lan0", TARGETS, DhcpMode.PROXY, on_reply_sent=latencies.append)
    endpoint = _Endpoint(responder, 67)
    endpoint.transport = _FakeTransport()  # type: ignore[assignment]
    source = ("0.0.0.0", 68)
    endpoint.datagram_received(b"\x00" * 10, source)  # dropped: no reply, no latency
    endpoint.datagram_received(_discover(), source)
    endpoint.datagram_received(_discover(), source)
    assert responder.stats.replies_sent == 2
    assert len(latencies) == 2 and all(0 <= s < 5 for s in latencies)


def test_dhcp_reply_hook_that_raises_costs_nothing_but_a_log_line() -> None:
    def broken(seconds: float) -> None:
        raise RuntimeError("metrics bug")

    responder = DhcpResponder("lan0", TARGETS, DhcpMode.PROXY, on_reply_sent=broken)
    endpoint = _Endpoint(responder, 67)
    endpoint.transport = _FakeTransport()  # type: ignore[assignment]
    endpoint.datagram_received(_discover(), ("0.0.0.0", 68))
    endpoint.datagram_received(_discover(), ("0.0.0.0", 68))
    assert responder.stats.replies_sent == 2


def test_tftp_events_carry_the_transfer_duration_with_a_default_for_old_callers() -> None:
    assert TftpEvent(("10.0.0.5", 2000), "f", TftpEventKind.STARTED, 0).seconds == 0.0
    ended = TftpEvent(("10.0.0.5", 2000), "f", TftpEventKind.COMPLETED, 512, 1.25)
    assert ended.seconds == 1.25
