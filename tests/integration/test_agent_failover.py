"""The imaging agent outlives the responder that booted it: when the server on its command
line gives no answer at all (the peer was killed between rendering the boot script and
the agent's first request), it asks the subnet's PXE boot server again and carries on
with the peer elected in its place (issue 11, point 5: tests/lab/test_faults.py found a
machine holding on "FAILED no plan" after the responder was killed).

The agent and its server are tests/integration/test_signed_imaging_agent.py's; the
boot-server discovery on port 4011 is a stub `pxe-discover` on PATH that prints the live
server (the real tool is tested against a real serve in test_imager_discovery.py)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.test_signed_imaging_agent import (  # noqa: F401 (fixtures)
    DISK_BYTES,
    NAME,
    SECRET,
    Lab,
    Server,
    keys,
    serving,
)
from tests.integration.test_signed_imaging_agent import lab as lab


def _dead_url() -> str:
    """A 127.0.0.1 port nobody listens on: connection refused, as a killed peer's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _stub_discover(lab: Lab, answer: str) -> tuple[Path, Path]:
    """A pxe-discover that records its arguments and prints `answer`; (bin dir, log)."""
    bin_dir, calls = lab.work / "stub-bin", lab.work / "discover-calls"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "pxe-discover"
    stub.write_text(f'#!/bin/sh\necho "$*" >>{calls}\necho {answer}\n')
    stub.chmod(0o755)
    return bin_dir, calls


def test_the_agent_asks_the_boot_server_again_when_its_server_is_gone(lab: Lab) -> None:
    dead = _dead_url()
    bin_dir, calls = _stub_discover(lab, lab.server.url)
    result = lab.run_agent(
        env={
            "PXEPEER_CMDLINE": f"console=ttyS0 pxepeer.server={dead} pxepeer.image={NAME}",
            "PXEPEER_IFACE": "eth0",
            "PATH": f"{bin_dir}:{lab.work / 'applets'}",
        }
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "PXEPEER-IMAGING: done" in result.stdout
    assert f"boot server {dead} does not answer; {lab.server.url} answers PXE now" in (
        result.stdout
    )
    assert calls.read_text().split("\n")[0].endswith("eth0")
    written = lab.disk.read_bytes()
    assert written[: len(lab.image)] == lab.image
    assert written[len(lab.image) :] == bytes(DISK_BYTES - len(lab.image))
    # The plan and the signed manifest both came from the peer that answered.
    assert lab.server.plan_methods == ["POST"]
    assert f"GET /v1/manifests/{lab.manifest.manifest_id}/canonical" in lab.server.requests


def test_without_an_interface_to_ask_on_the_agent_keeps_its_server(lab: Lab) -> None:
    """No NIC of its own to ask on (the agent run outside the imager, no PXEPEER_IFACE):
    no discovery, and the live server on the command line is used as before."""
    bin_dir, calls = _stub_discover(lab, _dead_url())
    result = lab.run_agent(env={"PATH": f"{bin_dir}:{lab.work / 'applets'}"})

    assert result.returncode == 0, result.stdout + result.stderr
    assert not calls.exists()
    assert "answers PXE now" not in result.stdout


def _image_with_successor(lab: Lab, secret: str) -> tuple[Server, str]:
    """Run the agent while a second peer, the one elected after the planning peer, answers
    PXE discovery and hands out plans with its own job `secret`; (that peer, stdout)."""
    successor = Server(lab.server.store, lab.server.library)
    render = lab.plan_for(lab.manifest)
    successor.plan = lambda url, method: render(url, method).replace(SECRET, secret)
    with serving(successor):
        bin_dir, _ = _stub_discover(lab, successor.url)
        result = lab.run_agent(
            env={"PXEPEER_IFACE": "eth0", "PATH": f"{bin_dir}:{lab.work / 'applets'}"}
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert lab.disk.read_bytes()[: len(lab.image)] == lab.image
    return successor, result.stdout


def test_a_final_report_the_planning_peer_cannot_take_goes_to_the_peer_elected_after_it(
    lab: Lab,
) -> None:
    """The responder dies after handing out the plan and the chunks: the machine is
    imaged, and its "done" must still reach the site (only that records it as imaged).
    The agent asks the boot server who answers now, gets a job of its own there (a plan
    for the same signed manifest) and reports done to it with that job's secret."""
    lab.server.gone_after_plan = True
    other_secret = "0ddba11" + "0" * 25
    successor, out = _image_with_successor(lab, other_secret)
    assert "PXEPEER-IMAGING: done" in out
    assert lab.server.reports == []  # it heard none of them
    assert successor.plan_methods == ["POST"]  # a job of its own, not a preview
    [(body, job)] = [r for r in successor.reports if "state=done" in r[0]]
    assert job == other_secret
    assert f"manifest={lab.manifest.manifest_id}" in body
    # The disk was written from the first peer only: the successor served no chunk.
    assert not any("/v1/chunks/" in r for r in successor.requests)


def test_a_run_whose_planning_peer_dies_before_the_manifest_reports_to_its_successor(
    lab: Lab,
) -> None:
    """The responder is killed right after it hands out the plan (tests/lab/test_faults.py
    caught this): the agent finds the peer elected in its place while fetching the signed
    manifest, and images from it. Its reports must go there with a job of that peer's:
    sent with the dead peer's secret they were refused, and the machine was never
    recorded as imaged, so its next boot would image it again."""
    lab.server.silent_after_plan = True
    other_secret = "5ecc0550" + "0" * 24
    successor, out = _image_with_successor(lab, other_secret)
    assert "answers PXE now" in out
    # A job there when the first report found it, and a fresh plan when the chunks the
    # dead peer's plan named failed: not a job per report.
    assert successor.plan_methods == ["POST", "POST"]
    assert successor.reports, out
    assert {job for _, job in successor.reports} == {other_secret}
    assert any("state=done" in body for body, _ in successor.reports)


def test_a_final_report_nobody_takes_does_not_hold_a_finished_machine(lab: Lab) -> None:
    """No peer answers reports and none is elected in its place: the machine is still
    done (its disk verified), and says the site may image it again."""
    lab.server.gone_after_plan = True
    bin_dir, _ = _stub_discover(lab, lab.server.url)  # the same, silent server again
    result = lab.run_agent(
        env={"PXEPEER_IFACE": "eth0", "PATH": f"{bin_dir}:{lab.work / 'applets'}"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PXEPEER-IMAGING: done" in result.stdout
    assert "no peer took the final report" in result.stdout + result.stderr
