"""Finding peers: mDNS/DNS-SD `_pxepeer._tcp` (zeroconf) plus static `--peer` endpoints.

Discovery only proposes endpoints; whether a peer is alive is decided by heartbeats
(peer/membership.py), because zeroconf keeps a killed peer's records for their TTL.
`avahi-browse -r _pxepeer._tcp` shows what is announced here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.core.rejections import Rejections
from peer.core.wire import NODE_ID

SERVICE_TYPE = "_pxepeer._tcp.local."

log = logging.getLogger("pxepeer.discovery")

MAX_RESOLVING = 32  # announcements resolved at once; a flood waits for re-announcement


class MdnsDiscovery:
    def __init__(
        self,
        node_id: str,
        site: str,
        address: str,
        http_port: int,
        on_endpoint: Callable[[str, str], None],  # (node id, "host:port")
        rejections: Rejections | None = None,
    ):
        self.node_id, self.site, self.address, self.http_port = node_id, site, address, http_port
        self.on_endpoint = on_endpoint
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()
        self.rejections = rejections or Rejections()

    async def start(self) -> None:
        # Only the interface we were given: announcing on every interface would leak the
        # site's peers onto networks that are not the site.
        self._azc = AsyncZeroconf(interfaces=[self.address], ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"pxepeer-{self.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.address)],
            port=self.http_port,
            properties={"node": self.node_id, "site": self.site, "port": str(self.http_port)},
            server=f"pxepeer-{self.node_id}.local.",
        )
        await self._azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )
        log.info("mDNS: announcing %s on %s:%d", SERVICE_TYPE, self.address, self.http_port)

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            if len(self._tasks) >= MAX_RESOLVING:
                self.rejections.count("mdns", "flood")  # the next announcement will come
                return
            task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        # Anyone on the LAN can announce anything: a record that does not resolve into a
        # plausible endpoint is dropped, and no failure here escapes the task.
        try:
            await self._resolve_one(zeroconf, service_type, name)
        except Exception as exc:
            self.rejections.count("mdns", "unresolvable")
            log.debug("mDNS: ignoring %r: %s", name[:80], exc)

    async def _resolve_one(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000):
            return
        if not info.port or not 0 < info.port < 65536:
            self.rejections.count("mdns", "bad port")
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        node = props.get("node", "")
        if not node or node == self.node_id or props.get("site") != self.site:
            return
        if not NODE_ID.fullmatch(node):
            self.rejections.count("mdns", "bad node id")
            return
        for addr in info.parsed_addresses(IPVersion.V4Only)[:4]:
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
                self.rejections.count("mdns", "unreachable address")
                continue
            self.on_endpoint(node, f"{addr}:{info.port}")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
