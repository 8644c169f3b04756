"""The imager's boot-server discovery (imaging/agent/pxe-discover.c), compiled as
images/imager/build.sh compiles it, against a real `pxepeer serve` in a network
namespace: a signed unified kernel image names no server on its command line, so the
imager asks on port 4011 and gets the elected peer's HTTP service."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_serve_secure_boot import BASE, REPO, site  # noqa: F401 (fixture)
from tests.netns import can_use_netns, link, namespaces

SOURCE = REPO / "imaging" / "agent" / "pxe-discover.c"

skip_reason = can_use_netns() or (None if shutil.which("gcc") else "gcc is not installed")
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


@pytest.fixture(scope="module")
def discover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool = tmp_path_factory.mktemp("discover") / "pxe-discover"
    subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(tool), str(SOURCE)],
        check=True,
    )
    return tool


def test_the_imager_finds_the_elected_peers_http_service(site, discover: Path) -> None:  # noqa: F811
    result = site["cli"].run(str(discover), "-t", "10", "eth0", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{BASE}\n"
    # It asked on 4011 and was answered there, unicast, as the imager.
    log = site["log"].read_text()
    assert "port=4011" in log and "pxepeer imager asks for its server" in log, log[-2000:]


def test_with_no_boot_server_on_the_subnet_it_gives_up_in_time(discover: Path) -> None:
    with namespaces("lone", "quiet") as (lone, quiet):
        link(quiet, "lan0", "10.231.10.1/24", lone, "eth0", "10.231.10.50/24")
        started = time.monotonic()
        result = lone.run(str(discover), "-t", "2", "eth0", check=False)
        assert result.returncode == 1
        assert "no PXE boot server answered on eth0" in result.stderr
        assert time.monotonic() - started < 6


def test_bad_usage_is_one_line_and_exit_2(discover: Path) -> None:
    for argv in ([], ["-t", "x", "eth0"], ["eth0", "eth1"]):
        result = subprocess.run([str(discover), *argv], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
