"""Supervised background tasks: none dies silently, each comes back.

A task started with `create_task` and never awaited dies without a word; one bad hello
once killed the heartbeat loop that way, and the peer went on answering PXE alone. Here
every long-running loop is started by name; when it raises, the failure is logged with
its traceback (the first time that failure is seen; repeats get one line), counted,
shown in status as a warning, and the loop is restarted after a back-off that doubles
from 1 s to 60 s and resets once the loop has run cleanly for a minute. `on_change`
tells the owner when a loop goes down or comes back (the site stops answering PXE
while its membership loop is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("pxepeer.supervisor")

BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 60.0, 60.0


@dataclass
class TaskRecord:
    name: str
    factory: Callable[[], Awaitable[None]]
    task: asyncio.Task | None = None
    running: bool = False
    failures: int = 0
    last_error: str | None = None
    last_failure: float | None = None  # Unix time
    backoff: float = 0.0  # set at start
    seen: set[str] = field(default_factory=set)  # failure signatures already logged in full


class Supervisor:
    def __init__(self, on_change: Callable[[str, bool], None] = lambda name, up: None):
        self._records: dict[str, TaskRecord] = {}
        self._on_change = on_change
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        record = TaskRecord(name, factory, backoff=BACKOFF_FIRST)
        self._records[name] = record
        record.task = asyncio.create_task(self._keep(record), name=f"supervised:{name}")

    async def _keep(self, record: TaskRecord) -> None:
        while not self._stopping:
            began = time.monotonic()
            record.running = True
            self._on_change(record.name, True)
            try:
                await record.factory()
                error: BaseException | None = None
                summary = "returned"
            except asyncio.CancelledError:
                record.running = False
                raise
            except Exception as exc:  # the point of a supervisor: any failure is handled
                error = exc
                summary = f"{type(exc).__name__}: {exc}"[:300]
            record.running = False
            self._on_change(record.name, False)
            if self._stopping:
                return
            if time.monotonic() - began >= HEALTHY_AFTER:
                record.backoff = BACKOFF_FIRST
            record.failures += 1
            record.last_error = summary
            record.last_failure = time.time()
            signature = f"{type(error).__name__}:{str(error)[:80]}" if error else "returned"
            if signature not in record.seen and len(record.seen) < 64:
                record.seen.add(signature)
                log.error(
                    "task %s failed (%s); restarting in %.0f s",
                    record.name, summary, record.backoff, exc_info=error,
                )  # fmt: skip
            else:
                log.error(
                    "task %s failed again (%s, %d failures); restarting in %.0f s",
                    record.name, summary, record.failures, record.backoff,
                )  # fmt: skip
            await asyncio.sleep(record.backoff)
            record.backoff = min(record.backoff * 2, BACKOFF_MAX)

    def running(self, name: str) -> bool:
        record = self._records.get(name)
        return record is not None and record.running

    def failures(self) -> dict[str, int]:
        return {name: r.failures for name, r in self._records.items()}

    def warnings(self) -> list[str]:
        out = []
        for record in self._records.values():
            if record.failures:
                state = "running again" if record.running else "down, restarting"
                out.append(
                    f"task {record.name} failed {record.failures} time(s), last: "
                    f"{record.last_error} ({state})"
                )
        return out

    def status(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "running": r.running,
                "failures": r.failures,
                "last_error": r.last_error,
                "last_failure": r.last_failure,
            }
            for name, r in self._records.items()
        }

    async def stop(self) -> None:
        self._stopping = True
        tasks = [r.task for r in self._records.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
