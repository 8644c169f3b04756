"""`vagrant/lab.sh up` as a user runs it, with the shipped Vagrantfile, for the BIOS client
(the faster of the two under TCG; `lab.sh up` brings up both by default): a Vagrant VM
with no box network-boots from the site of pxepeer peers, is imaged with the demo OS and
boots it from its disk. Then `lab.sh down` leaves nothing behind: no domain, libvirt
network or pool, namespace, bridge, nor any process lab.sh started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.boot_servers import REPO
from tests.lab.vagrant_lab import (
    BOOTED,
    CLIENTS,
    DOMAIN_PREFIX,
    HOST_BRIDGE,
    IMAGED,
    LIBVIRT_NAME,
    NS_PREFIX,
    UPLINK,
    Paths,
    alive,
    libvirt_answers,
    link_exists,
    pid_from,
    virsh_names,
)

pytestmark = pytest.mark.lab

LAB_SH = REPO / "vagrant" / "lab.sh"
UP_TIMEOUT = 900  # measured ~105 s on the shared 2-core host (images cached)
CLIENT = "client-bios"
SUMMARY = re.compile(
    rf"{CLIENT}: imaging job (\w+), (\d+)/(\d+) chunks from peers (.*); "
    r"booted the demo OS from its disk \(firmware (\w+)\)"
)


def _vagrant_missing() -> str | None:
    for tool, package in (("vagrant", "vagrant"), ("libvirtd", "libvirt-daemon-system"),
                          ("virsh", "libvirt-clients"), ("nginx", "nginx-light")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    gems = Path("/usr/share/rubygems-integration/all/gems")
    if not any(gems.glob("vagrant-libvirt-*")):
        return "vagrant-libvirt is not installed (apt-get install vagrant-libvirt)"
    if link_exists(HOST_BRIDGE):
        return f"a Vagrant lab is up on this host already ({HOST_BRIDGE}): vagrant/lab.sh down"
    return None


def _lab_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # The suite's venv runs pxepeer already: lab.sh uses it as it is.
    env = dict(os.environ, PXEPEER_VENV=sys.prefix)
    return subprocess.run([str(LAB_SH), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Under /var/tmp, searchable by libvirt's QEMU user (pytest's tmp_path is not)."""
    work = Path(tempfile.mkdtemp(prefix="pxepeer-vagrant-test-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        _lab_sh("down", "--workdir", str(work), timeout=300)  # whatever the test left
        shutil.rmtree(work, ignore_errors=True)


def test_lab_sh_up_images_a_boxless_vagrant_client_that_boots_its_disk_and_down_leaves_nothing(
    workdir: Path,
) -> None:
    reason = _vagrant_missing()
    if reason:
        pytest.skip(reason)
    paths = Paths(workdir)
    start = time.monotonic()
    up = _lab_sh("up", "--clients", "bios", "--workdir", str(workdir), "--dashboard-port", "0",
                 timeout=UP_TIMEOUT)  # fmt: skip
    took = time.monotonic() - start
    out = up.stdout + up.stderr
    assert up.returncode == 0, out
    assert "Traceback" not in out, out

    # The client the shipped Vagrantfile describes, brought up by Vagrant, box-less.
    vagrant_log = paths.vagrant_log.read_text()
    assert f"Source: {REPO / 'vagrant' / 'Vagrantfile'}" in vagrant_log, vagrant_log
    assert f"{DOMAIN_PREFIX}{CLIENT}" in vagrant_log, vagrant_log
    boxes = workdir / "vagrant.d" / "boxes"  # VAGRANT_HOME: where a downloaded box would be
    assert not boxes.exists() or not any(boxes.iterdir()), list(boxes.iterdir())

    # Imaged by pxepeer: the job is done, every chunk, from the site's peers...
    match = SUMMARY.search(out)
    assert match, out
    state, done, total, peers, firmware = match.groups()
    assert state == "done" and int(done) == int(total) > 0, out
    assert len(peers.split()) >= 2, out  # a swarm, not one server
    assert firmware == "bios", out
    # ... then its next network boot was sent to its disk, which booted the demo OS.
    assert "already imaged" in out, out
    console = (paths.clients / f"{CLIENT}.log").read_text(errors="replace")
    assert "PXEPEER-IMAGING: writing to /dev/vda" in console, console[-3000:]
    assert -1 < console.find(IMAGED) < console.find(BOOTED), console[-3000:]

    # The lab is still up for the user to look at; libvirt's default network untouched.
    status = _lab_sh("status", "--workdir", str(workdir), timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"domain {DOMAIN_PREFIX}{CLIENT}: shut off" in status.stdout, status.stdout
    assert f"{CLIENT} ({CLIENTS[CLIENT]['mac']}): booted the demo OS" in status.stdout
    assert f"imaging mac={CLIENTS[CLIENT]['mac']}" in status.stdout, status.stdout
    assert "default" not in virsh_names("net-list"), "libvirt's default network was started"

    site = json.loads(paths.site_json.read_text())
    site_pid = pid_from(paths.site_pid)
    daemons = {needle: pid_from(pid_file) for needle, pid_file in
               (("libvirtd", paths.libvirtd_pid), ("virtlogd", paths.virtlogd_pid))}  # fmt: skip
    assert site_pid == site["pid"] and alive(site_pid, "vagrant_lab")

    down = _lab_sh("down", "--workdir", str(workdir), timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"domain {DOMAIN_PREFIX}{CLIENT}" in down.stdout, down.stdout

    # Nothing left.
    assert not alive(site_pid, "vagrant_lab")
    for needle, pid in daemons.items():  # those lab.sh started (none if libvirtd ran)
        assert not alive(pid, needle), needle
    if libvirt_answers():  # a libvirtd lab.sh did not start
        assert not [d for d in virsh_names("list", "--all") if d.startswith(DOMAIN_PREFIX)]
        assert LIBVIRT_NAME not in virsh_names("net-list", "--all")
        assert LIBVIRT_NAME not in virsh_names("pool-list", "--all")
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
    assert f"{NS_PREFIX}{site_pid}-" not in namespaces, namespaces
    assert not link_exists(HOST_BRIDGE) and not link_exists(UPLINK)
    assert not paths.site_json.exists()
    # Where the time went (seen with -s): lab.sh's steps, stamped from its start.
    print(f"\nlab.sh up (one BIOS client) took {took:.0f} s:")
    print("\n".join(line for line in out.splitlines() if re.search(r"\[\d+ s\]$", line)))
