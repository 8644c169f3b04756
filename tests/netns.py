"""Throw-away network namespaces for tests: made here, deleted here, on every exit path.

Only addresses inside these namespaces are ever used; nothing has a default route.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

_created: list[str] = []


def can_use_netns() -> str | None:
    """None when namespaces can be made here, else the reason for skipping."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _delete_all() -> None:
    while _created:
        sh("ip", "netns", "del", _created.pop(), check=False)


atexit.register(_delete_all)


class Netns:
    def __init__(self, name: str):
        self.name = name

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*self.exec_argv(*argv), check=check)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(*argv), **kwargs)


@contextlib.contextmanager
def namespaces(*suffixes: str) -> Iterator[list[Netns]]:
    """Namespaces named pxpt<pid>-<suffix>, with loopback up, deleted on exit."""
    made = []
    try:
        for suffix in suffixes:
            name = f"pxpt{os.getpid()}-{suffix}"
            sh("ip", "netns", "add", name)
            _created.append(name)
            made.append(Netns(name))
            made[-1].run("ip", "link", "set", "lo", "up")
        yield made
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns.name, check=False)
            if ns.name in _created:
                _created.remove(ns.name)


def link(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
    """A veth pair between two namespaces, addressed (CIDR) and up."""
    tmp_a, tmp_b = f"v{os.getpid() % 100000}{a_if}"[:15], f"v{os.getpid() % 100000}{b_if}"[:15]
    sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    sh("ip", "link", "set", tmp_a, "netns", a.name, "name", a_if)
    sh("ip", "link", "set", tmp_b, "netns", b.name, "name", b_if)
    for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        if addr:
            ns.run("ip", "addr", "add", addr, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")
