"""Responder failover with real firmware: two peers, the responder is killed, and a VM
that powers on afterwards still network-boots from the peer that took over."""

from __future__ import annotations

import time

import pytest

from tests.lab.boot_servers import (
    MACS,
    PxepeerServer,
    PxepeerStore,
    enrolled_copy,
    start_pxepeer,
)
from tests.lab.virtual_store import Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

MARKER = "PXEPEER-TEST-IMAGE: booted"


def _site(server: PxepeerServer) -> dict:
    return server.status()["site"]


def _wait(what: str, check, timeout: float, *servers: PxepeerServer) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (LabError, OSError, KeyError):
            pass
        time.sleep(0.5)
    logs = "\n".join(s.service.log_text()[-3000:] for s in servers)
    raise AssertionError(f"timed out: {what}\n{logs}")


def test_vm_boots_from_the_peer_that_took_over_after_the_responder_died(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router()
    first_peer, second_peer = lab.add_peer("peer1"), lab.add_peer("peer2")
    # Both enrolled with the lab's enroll key: one site. peer1, up first, takes the role
    # and keeps it when peer2 joins (whatever their node ids).
    first = start_pxepeer(
        lab, first_peer, enrolled_copy(pxepeer_store, lab.workdir, "peer1"),
        extra_args=("--peer", f"{second_peer.ip}:8080"), name="peer1-serve",
    )  # fmt: skip
    _wait("peer1 to answer PXE", lambda: _site(first)["this_peer_responds"], 30, first)
    second = start_pxepeer(
        lab, second_peer, enrolled_copy(pxepeer_store, lab.workdir, "peer2"),
        extra_args=("--peer", f"{first_peer.ip}:8080"), name="peer2-serve",
    )  # fmt: skip
    _wait(
        "both peers to agree that peer1 (up first) answers PXE",
        lambda: (
            _site(second)["responders"] == [_site(first)["node_id"]]
            and _site(first)["this_peer_responds"]
        ),
        30,
        first,
        second,
    )

    first.service.proc.kill()  # a power cut: no goodbye
    first.service.proc.wait()
    _wait("peer2 to take over", lambda: _site(second)["this_peer_responds"], 15, second)

    vm = lab.boot_vm("after-failover", Firmware.BIOS, MACS["bios"])
    try:
        vm.wait_for(MARKER, timeout=240)
    except LabError as exc:
        raise AssertionError(f"{exc}\n{second.service.log_text()[-3000:]}") from None
    machine = second.machine(MACS["bios"])
    assert machine is not None
    assert {"offer", "script", "kernel"} <= {s["stage"] for s in machine["stages"]}
