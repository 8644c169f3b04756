"""`pxepeer install-service` and the unit it installs: the files land under --root (an
existing config is kept), `systemd-analyze verify` accepts the unit, and `pxepeer serve`
started with the unit's ExecStart arguments and with nothing but the unit's capabilities
(setpriv cuts the bounding set to them) serves HTTP, binds DHCP on the interface its
config file names, and logs JSON lines.

systemd is not PID 1 in CI's containers, so the unit itself is not started by systemd."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imaging.signing import generate_keypair
from peer.cli import main
from tests.netns import Netns, can_use_netns, link, namespaces

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
UNIT = Path("etc/systemd/system/pxepeer.service")
CONFIG = Path("etc/pxepeer/pxepeer.toml")
SERVER_IP = "10.231.9.1"
IPXE_DIR = Path("/usr/lib/ipxe")


def pxepeer(*args: str) -> Result:
    """A quick command in this process (the daemon is the one started for real)."""
    return CliRunner().invoke(main, list(args))


def unit_settings(text: str) -> dict[str, str]:
    """The unit's Key=value lines (the last one wins, as systemd reads them)."""
    settings = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    result = pxepeer("install-service", "--root", str(root))
    assert result.exit_code == 0, result.output
    return root


def test_install_service_writes_the_unit_user_and_example_config_and_says_what_next(
    installed: Path,
) -> None:
    unit = (installed / UNIT).read_text()
    settings = unit_settings(unit)
    executable, *args = shlex.split(settings["ExecStart"])
    assert Path(executable).is_absolute() and Path(executable).name == "pxepeer"
    assert args == ["serve", "--config", "/etc/pxepeer/pxepeer.toml"]
    assert settings["AmbientCapabilities"].split() == ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"]
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                       ("StateDirectory", "pxepeer"), ("User", "pxepeer"),
                       ("Restart", "on-failure")]:  # fmt: skip
        assert settings[key] == value, key
    assert "u pxepeer " in (installed / "etc/sysusers.d/pxepeer.conf").read_text()
    assert "# interface = " in (installed / CONFIG).read_text()


def test_install_service_never_overwrites_a_config(tmp_path: Path) -> None:
    config = tmp_path / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text('interface = "eth0"\n')
    result = pxepeer("install-service", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert config.read_text() == 'interface = "eth0"\n'
    assert "kept (exists)" in result.stdout and "systemctl enable --now pxepeer" in result.stdout
    assert (tmp_path / UNIT).exists()


def test_install_service_refuses_an_executable_that_is_not_one(tmp_path: Path) -> None:
    result = pxepeer("install-service", "--root", str(tmp_path), "--executable", "/nonexistent")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "pxepeer: error: --executable /nonexistent: not an executable file"
    ]
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_the_installed_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    unit = installed / UNIT
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown or misspelt settings are only warnings (exit 0): none may name our file.
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stderr


skip_netns = can_use_netns() or (
    None if shutil.which("setpriv") else "setpriv (util-linux) is not installed"
) or (None if (IPXE_DIR / "snponly.efi").exists() else "Debian's ipxe package is not installed")


@pytest.mark.skipif(skip_netns is not None, reason=skip_netns or "")
def test_serve_from_the_units_command_line_with_only_its_capabilities(
    installed: Path, tmp_path: Path
) -> None:
    settings = unit_settings((installed / UNIT).read_text())
    executable, *args = shlex.split(settings["ExecStart"])
    assert Path(executable).is_file()  # the pxepeer the unit runs; we run this checkout's
    keys = tmp_path / "keys"
    generate_keypair(keys, "publisher", "publisher")
    config = tmp_path / "pxepeer.toml"
    config.write_text(
        # The interface is named only here: that is naming it explicitly.
        f'interface = "lan0"\ncache-dir = "{tmp_path / "cache"}"\n'
        f'trust = ["{keys / "publisher.pub"}"]\nipxe-dir = "{IPXE_DIR}"\nlog-format = "json"\n'
    )
    args[args.index("--config") + 1] = str(config)
    caps = ",".join("+" + c.removeprefix("CAP_").lower()
                    for c in settings["CapabilityBoundingSet"].split())  # fmt: skip
    setpriv = ["setpriv", f"--bounding-set=-all,{caps}", f"--inh-caps=-all,{caps}",
               f"--ambient-caps=-all,{caps}", "--no-new-privs"]  # fmt: skip
    with namespaces("svc", "cli") as (srv, cli):
        link(srv, "lan0", f"{SERVER_IP}/24", cli, "eth0", "10.231.9.50/24")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PXEPEER_")}
        proc = srv.popen(*setpriv, *PXEPEER, *args, cwd=REPO, text=True, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            assert _wait_for_status(cli, proc)["interface"] == "lan0"
            status = (Path("/proc") / str(proc.pid) / "status").read_text()
            bounding = next(line for line in status.splitlines() if line.startswith("CapBnd"))
            assert int(bounding.split()[1], 16) == (1 << 10) | (1 << 13)  # BIND_SERVICE, RAW
        finally:
            proc.send_signal(signal.SIGTERM)  # what systemctl stop sends
            try:
                stdout, stderr = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in (stdout + stderr).splitlines()]  # every line
    assert all({"time", "level", "logger", "message"} <= set(doc) for doc in lines)
    # DHCP bound port 67 on the interface the file named, with CAP_NET_BIND_SERVICE alone
    # (a failed bind ends serve with exit 1).
    assert any(d["logger"] == "pxepeer.dhcp" and "on lan0 ports 67" in d["message"]
               for d in lines), lines  # fmt: skip


def _wait_for_status(ns: Netns, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.communicate()}")
        result = ns.run("curl", "-sf", f"http://{SERVER_IP}:8080/v1/status", check=False)
        if result.returncode == 0:
            return json.loads(result.stdout)
        time.sleep(0.2)
    raise AssertionError("serve did not come up")

