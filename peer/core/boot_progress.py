"""Each machine's way through a network boot, as the status API shows it.

Stages arrive from three servers that each know the machine differently: DHCP by MAC,
TFTP and HTTP by IP address. The iPXE script request carries the MAC and comes from the
machine's IP, which ties the two together; a 4011 REQUEST does the same.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum


class Stage(Enum):
    OFFER = "offer"  # a DHCP offer/ack with boot information was sent
    TFTP = "tftp"  # first stage fetched over TFTP
    SCRIPT = "script"  # iPXE fetched its boot script
    KERNEL = "kernel"
    INITRD = "initrd"
    IMAGING = "imaging"  # the imaging agent's reports: plan, progress, done
    FAILED = "failed"


@dataclass
class MachineProgress:
    mac: str
    ip: str | None = None
    arch: str | None = None
    image: str | None = None
    stages: list[tuple[str, float, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "mac": self.mac,
            "ip": self.ip,
            "arch": self.arch,
            "image": self.image,
            "last_stage": self.stages[-1][0] if self.stages else None,
            "stages": [{"stage": s, "at": t, "detail": d} for s, t, d in self.stages],
        }


class BootProgress:
    """In-memory record of recent boots, bounded so a busy site cannot grow it forever."""

    def __init__(self, max_machines: int = 1024, clock=time.time):
        self._machines: OrderedDict[str, MachineProgress] = OrderedDict()
        self._mac_by_ip: dict[str, str] = {}
        self._max = max_machines
        self._clock = clock

    def _machine(self, mac: str) -> MachineProgress:
        machine = self._machines.pop(mac, None) or MachineProgress(mac=mac)
        self._machines[mac] = machine
        while len(self._machines) > self._max:
            _, dropped = self._machines.popitem(last=False)
            if dropped.ip is not None:
                self._mac_by_ip.pop(dropped.ip, None)
        return machine

    def learn_ip(self, mac: str, ip: str) -> None:
        machine = self._machine(mac)
        machine.ip = ip
        self._mac_by_ip[ip] = mac

    def record(
        self,
        stage: Stage,
        *,
        mac: str | None = None,
        ip: str | None = None,
        detail: str = "",
        arch: str | None = None,
        image: str | None = None,
    ) -> MachineProgress | None:
        if mac is None and ip is not None:
            mac = self._mac_by_ip.get(ip)
        if mac is None:
            return None  # a fetch we cannot tie to a machine (e.g. curl by hand)
        machine = self._machine(mac)
        if ip is not None and machine.ip != ip:
            self.learn_ip(mac, ip)
        if arch is not None:
            machine.arch = arch
        if image is not None:
            machine.image = image
        machine.stages.append((stage.value, self._clock(), detail))
        del machine.stages[:-50]
        return machine

    def snapshot(self) -> list[dict[str, object]]:
        return [m.as_dict() for m in reversed(self._machines.values())]
