"""Supervised tasks: a failure is logged, counted, shown and followed by a restart, and
a site whose heartbeat loop is down stops answering PXE."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from imaging.signing import TrustedKeys
from peer.adapters import supervisor as supervisor_module
from peer.adapters.site import HEARTBEAT_TASK, Site, SiteConfig
from peer.adapters.supervisor import Supervisor
from peer.store.content_store import ContentStore
from peer.store.node_identity import load_identity


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "BACKOFF_FIRST", 0.01)


def test_a_failing_task_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = []
    changes: list[tuple[str, bool]] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("poisoned hello")
        await asyncio.sleep(3600)

    async def scenario() -> Supervisor:
        sup = Supervisor(lambda name, up: changes.append((name, up)))
        sup.start("heartbeat", flaky)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(runs) >= 3:
                break
        await asyncio.sleep(0.01)
        return sup

    async def main() -> tuple[Supervisor, list[str], bool]:
        sup = await scenario()
        warnings, running = sup.warnings(), sup.running("heartbeat")
        await sup.stop()
        return sup, warnings, running

    with caplog.at_level(logging.ERROR, logger="pxepeer.supervisor"):
        sup, warnings, running = asyncio.run(main())
    assert len(runs) == 3
    assert running
    assert sup.failures() == {"heartbeat": 2}
    assert warnings and "poisoned hello" in warnings[0] and "running again" in warnings[0]
    # The traceback is logged the first time, a one-line note the second.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert ("heartbeat", False) in changes and changes[-1] == ("heartbeat", True)


def test_site_stops_answering_pxe_while_its_heartbeat_loop_is_down(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "cache")
    site = Site(
        SiteConfig(
            site="lab", address="127.0.0.1", http_port=1, can_answer_pxe=True, mdns=False
        ),
        store,
        TrustedKeys([]),
        identity=load_identity(store.state_dir),
    )
    ticks = []
    original_tick = site.core.tick

    def tick(now: float, wall: float):
        ticks.append(now)
        if len(ticks) == 1:
            raise RuntimeError("bug in a decision")
        return original_tick(now, wall)

    site.core.tick = tick  # type: ignore[method-assign]

    async def main() -> tuple[bool, bool, list[str], list[str]]:
        await site.start()
        await asyncio.sleep(0.005)
        down = not site.core.membership_running
        warnings_down = site.warnings()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if len(ticks) > 2:
                break
        up = site.supervisor.running(HEARTBEAT_TASK)
        status = site.status()
        await site.stop()
        return down, up, warnings_down, status["warnings"]  # type: ignore[return-value]

    down, up, warnings_down, warnings_after = asyncio.run(main())
    assert down, "the failed loop was not reported down"
    assert any("heartbeat loop" in w for w in warnings_down)
    assert up and site.core.membership_running
    assert any("task heartbeat failed 1 time" in w for w in warnings_after)
