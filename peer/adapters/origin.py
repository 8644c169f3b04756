"""The WAN side: fetching the catalog, manifests and chunks from the origin.

The catalog is polled with If-None-Match, so an unchanged catalog costs one small
request. Chunk downloads go through the token bucket and the delay controller: each
response's time to first byte is a round-trip sample, and the body is read in slices
that each wait for their budget, so `--wan-rate` holds over any interval longer than
a slice. A `--wan-rate` schedule is read again at each slice (cheaply: the schedule
itself is consulted only at window edges and once a minute), so a long download slows
down or speeds up at the edge of a window without being restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from imaging.control import CONTROL
from imaging.origin_layout import CATALOG, chunk_path, manifest_path
from peer.core.rate_schedule import RateSchedule
from peer.core.throttle import DelayController, ScheduledRate, TokenBucket, wire_bytes

SLICE = 64 * 1024
# A small document (catalog, control, manifest) that sends nothing for this long is an
# outage: a poll riding a kept-alive connection through a dead link must fail and show
# in status, not hang until the link is back. Chunk reads keep 30 s: they are paced.
DOC_READ_TIMEOUT = 10.0


class OriginError(Exception):
    """The origin could not be reached or answered badly."""


@dataclass
class OriginStats:
    requests: int = 0
    failures: int = 0
    bytes: int = 0
    not_modified: int = 0


@dataclass
class OriginClient:
    base_url: str
    session: aiohttp.ClientSession
    # Bytes per second (0 = unlimited) or a schedule of them; after construction
    # `wan_rate` is the site's rate the schedule sets now.
    wan_rate: float | RateSchedule = 0.0
    timeout: float = 60.0
    stats: OriginStats = field(default_factory=OriginStats)
    clock: Callable[[], datetime] = datetime.now  # the store's local wall clock

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not isinstance(self.wan_rate, RateSchedule):
            self.wan_rate = RateSchedule.constant(self.wan_rate)
        self.limit = ScheduledRate(self.wan_rate)
        self.limit.update(self.clock())
        self.wan_rate = self.limit.rate
        self.bucket = TokenBucket(self.wan_rate, burst=max(self.wan_rate * 0.25, SLICE))
        self.controller = DelayController(self.wan_rate)
        self._share = 1.0
        self._catalog_etag: str | None = None
        self._control_etag: str | None = None

    @property
    def current_rate(self) -> float:
        return self.bucket.rate

    def follow_schedule(self) -> None:
        """At a window edge, the new rate applies at once (in full: the delay
        controller backs off again if the link cannot take it)."""
        if not self.limit.update(self.clock()):
            return
        self.wan_rate = rate = self.limit.rate
        cap = rate / self._share
        self.controller.max_rate = self.controller.rate = cap
        self.bucket.set_rate(cap)
        self.bucket.burst = max(rate * 0.25, SLICE)
        self.bucket.tokens = min(self.bucket.tokens, self.bucket.burst)

    def set_share(self, divisor: float) -> None:
        """`--wan-rate` is the site's: this peer takes 1/`divisor` of it (the site core's
        `wan_share`: its fetches over the chunks open on the WAN site-wide), so the
        store's uplink sees the configured rate, not N times it. A share that grows
        applies at once, not only from the next request."""
        self._share = max(divisor, 1.0)
        self.follow_schedule()
        if self.wan_rate <= 0:
            return
        cap = self.wan_rate / self._share
        if cap != self.controller.max_rate:
            self.bucket.set_rate(self.controller.rescale(cap))

    async def _get(
        self, path: str, max_bytes: int, headers: dict[str, str] | None = None,
        absent_ok: bool = False, read_timeout: float = 30.0,
        on_piece: Callable[[bytes], None] | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """GET one document of at most `max_bytes`: a broken or hostile origin (or a
        proxy in front of it) that sends more is cut off, not buffered. `on_piece`
        sees each piece of a 200's body as it comes (unverified: a relay holds back
        the end until the whole has hashed right)."""
        url = f"{self.base_url}/{path}"
        self.stats.requests += 1
        sent = time.monotonic()
        try:
            async with self.session.get(
                url, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=read_timeout),
            ) as resp:
                rtt = time.monotonic() - sent
                self.follow_schedule()
                if self.wan_rate > 0:
                    self.bucket.set_rate(self.controller.observe(rtt, time.monotonic()))
                if resp.status == 304:
                    self.stats.not_modified += 1
                    return 304, b"", resp.headers.copy()
                if resp.status in (403, 404) and absent_ok:
                    # S3 answers 403 for a missing object when listing is not allowed.
                    return 404, b"", resp.headers.copy()
                if resp.status != 200:
                    raise OriginError(f"{url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise OriginError(f"{url}: {resp.content_length} bytes, over {max_bytes}")
                parts, total = [], 0
                async for piece in resp.content.iter_chunked(SLICE):
                    total += len(piece)
                    if total > max_bytes:
                        raise OriginError(f"{url}: more than {max_bytes} bytes")
                    parts.append(piece)
                    self.stats.bytes += len(piece)
                    if on_piece is not None:
                        on_piece(piece)
                    self.follow_schedule()
                    # Charged as the link carries it (headers too): see wire_bytes.
                    wait = self.bucket.delay_for(wire_bytes(len(piece)), time.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                # A case-insensitive copy: servers spell it ETag, aiohttp hands back Etag.
                return 200, b"".join(parts), resp.headers.copy()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.stats.failures += 1
            raise OriginError(f"{url}: {exc.__class__.__name__}: {exc}") from None
        except OriginError:
            self.stats.failures += 1
            raise

    async def fetch_catalog(self, max_bytes: int) -> bytes | None:
        """The catalog's bytes, or None when it has not changed since the last fetch."""
        headers = {"If-None-Match": self._catalog_etag} if self._catalog_etag else None
        status, body, resp_headers = await self._get(
            CATALOG, max_bytes, headers, read_timeout=DOC_READ_TIMEOUT
        )
        if status == 304:
            return None
        self._catalog_etag = resp_headers.get("ETag")
        return body

    def forget_catalog_etag(self) -> None:
        """After rejecting a catalog, fetch it in full next time (to log why again)."""
        self._catalog_etag = None

    async def fetch_control(self, max_bytes: int) -> bytes | None:
        """The control document's bytes (imaging/control.py); b"" when the origin has
        none (404, or S3's 403), None when it has not changed since the last fetch."""
        headers = {"If-None-Match": self._control_etag} if self._control_etag else None
        status, body, resp_headers = await self._get(
            CONTROL, max_bytes, headers, absent_ok=True, read_timeout=DOC_READ_TIMEOUT
        )
        if status == 304:
            return None
        self._control_etag = resp_headers.get("ETag") if status == 200 else None
        return body

    def forget_control_etag(self) -> None:
        """After refusing a control document, fetch it in full next time."""
        self._control_etag = None

    async def fetch_manifest(self, manifest_id: str, max_bytes: int) -> bytes:
        return (await self._get(manifest_path(manifest_id), max_bytes,
                                read_timeout=DOC_READ_TIMEOUT))[1]  # fmt: skip

    async def fetch_chunk(
        self, sha256: str, size: int, on_piece: Callable[[bytes], None] | None = None
    ) -> bytes:
        return (await self._get(chunk_path(sha256), size, on_piece=on_piece))[1]
