"""The WAN side: fetching the catalog, manifests and chunks from the origin.

The catalog is polled with If-None-Match, so an unchanged catalog costs one small
request. Chunk downloads go through the token bucket and the delay controller: each
response's time to first byte is a round-trip sample, and the body is read in slices
that each wait for their budget, so `--wan-rate` holds over any interval longer than
a slice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from imaging.origin_layout import CATALOG, chunk_path, manifest_path
from peer.core.throttle import DelayController, TokenBucket

SLICE = 64 * 1024


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
    wan_rate: float = 0.0  # bytes per second, 0 = unlimited
    timeout: float = 60.0
    stats: OriginStats = field(default_factory=OriginStats)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.bucket = TokenBucket(self.wan_rate, burst=max(self.wan_rate * 0.25, SLICE))
        self.controller = DelayController(self.wan_rate)
        self._catalog_etag: str | None = None

    @property
    def current_rate(self) -> float:
        return self.bucket.rate

    def set_share(self, peers_fetching: int) -> None:
        """`--wan-rate` is the site's: with N peers pulling from the origin at once, each
        takes 1/N of it, so the store's uplink sees the configured rate, not N times it."""
        if self.wan_rate <= 0:
            return
        cap = self.wan_rate / max(peers_fetching, 1)
        if cap != self.controller.max_rate:
            self.controller.max_rate = cap
            self.controller.rate = min(self.controller.rate, cap) or cap
            self.bucket.set_rate(min(self.bucket.rate, cap) or cap)

    async def _get(
        self, path: str, max_bytes: int, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """GET one document of at most `max_bytes`: a broken or hostile origin (or a
        proxy in front of it) that sends more is cut off, not buffered."""
        url = f"{self.base_url}/{path}"
        self.stats.requests += 1
        sent = time.monotonic()
        try:
            async with self.session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=30)
            ) as resp:
                rtt = time.monotonic() - sent
                if self.wan_rate > 0:
                    self.bucket.set_rate(self.controller.observe(rtt, time.monotonic()))
                if resp.status == 304:
                    self.stats.not_modified += 1
                    return 304, b"", resp.headers.copy()
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
                    wait = self.bucket.delay_for(len(piece), time.monotonic())
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
        status, body, resp_headers = await self._get(CATALOG, max_bytes, headers)
        if status == 304:
            return None
        self._catalog_etag = resp_headers.get("ETag")
        return body

    def forget_catalog_etag(self) -> None:
        """After rejecting a catalog, fetch it in full next time (to log why again)."""
        self._catalog_etag = None

    async def fetch_manifest(self, manifest_id: str, max_bytes: int) -> bytes:
        return (await self._get(manifest_path(manifest_id), max_bytes))[1]

    async def fetch_chunk(self, sha256: str, size: int) -> bytes:
        return (await self._get(chunk_path(sha256), size))[1]
