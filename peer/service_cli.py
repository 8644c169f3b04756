"""`pxepeer install-service`: put the systemd unit, the pxepeer system user's sysusers.d
entry and an example /etc/pxepeer/pxepeer.toml in place, then say what to run next.

It only writes files (under --root, for packaging and tests): creating the user,
reloading systemd and starting the service are the administrator's, printed at the end.
An existing config file is never overwritten; the unit is (changes belong in drop-ins).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import click

from peer.config_file import DEFAULT_PATH
from peer.config_file import config_template as example_config
from peer.serve import serve

UNIT_NAME = "pxepeer.service"
UNIT_DIR = Path("etc/systemd/system")
SYSUSERS = Path("etc/sysusers.d/pxepeer.conf")
SYSUSERS_LINE = 'u pxepeer - "pxepeer network boot peer" /var/lib/pxepeer\n'
# What ExecStart can hold without systemd quoting or specifier (%) rules getting involved.
PLAIN_PATH = re.compile(r"^/[A-Za-z0-9/._+-]+$")
EXEC_START = re.compile(r"^ExecStart=(\S+)", re.MULTILINE)


class ServiceError(click.ClickException):
    exit_code = 2


def shipped_unit() -> str:
    """The unit file as shipped (peer/data/pxepeer.service)."""
    return resources.files("peer.data").joinpath(UNIT_NAME).read_text()


def unit_for(executable: Path) -> str:
    """The shipped unit with ExecStart running `executable`."""
    text = shipped_unit()
    if len(EXEC_START.findall(text)) != 1:
        raise ServiceError(f"the shipped {UNIT_NAME} must have exactly one ExecStart")
    return EXEC_START.sub(lambda _: f"ExecStart={executable}", text)


def find_executable() -> Path:
    """The pxepeer script of the Python running this (a venv's bin/), else PATH's."""
    beside = Path(sys.executable).absolute().parent / "pxepeer"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("pxepeer")
    if found is None:
        raise ServiceError("cannot find the pxepeer executable: name it with --executable PATH")
    return Path(found).absolute()


def _under_home(*paths: Path) -> Path | None:
    """The first of `paths` (or what it links to) the unit's ProtectHome= would hide."""
    for path in paths:
        for candidate in (path.absolute(), path.resolve()):
            if candidate.parts[1:2] in (("home",), ("root",)) or candidate.parts[1:3] == (
                "run", "user",
            ):
                return candidate
    return None


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write whole or not at all: a half-written unit is worse than the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _put(root: Path, relative: Path, text: str, overwrite: bool) -> str:
    """Install one file; the word for what happened."""
    path = root / relative
    try:
        if path.exists():
            if not overwrite:
                return "kept (exists)"
            if path.read_text() == text:
                return "unchanged"
            _write(path, text)
            return "updated"
        _write(path, text)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None
    return "wrote"


@click.command("install-service")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default="/",
              show_default=True, help="Install under this directory instead of / (packaging, "
              "tests); the paths inside the files stay those of the target system.")  # fmt: skip
@click.option("--executable", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The pxepeer the unit runs (default: the one running this).")  # fmt: skip
@click.option("--config-template", is_flag=True,
              help="Print the example config file (every serve option, commented out) "
              "and install nothing.")  # fmt: skip
def install_service(root: Path, executable: Path | None, config_template: bool) -> None:
    """Install the systemd unit that runs `pxepeer serve --config /etc/pxepeer/pxepeer.toml`
    as the pxepeer user with only CAP_NET_BIND_SERVICE and CAP_NET_RAW."""
    if config_template:
        click.echo(example_config(serve), nl=False)
        return
    exe = executable.absolute() if executable is not None else find_executable()
    if not PLAIN_PATH.match(str(exe)):
        raise ServiceError(
            f"--executable {exe}: want a path of letters, digits and / . _ + - only"
        )
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise ServiceError(f"--executable {exe}: not an executable file")
    if root.exists() and not root.is_dir():
        raise ServiceError(f"--root {root} is not a directory")

    config_relative = DEFAULT_PATH.relative_to("/")
    done = [
        (UNIT_DIR / UNIT_NAME, _put(root, UNIT_DIR / UNIT_NAME, unit_for(exe), overwrite=True)),
        (SYSUSERS, _put(root, SYSUSERS, SYSUSERS_LINE, overwrite=True)),
        (config_relative, _put(root, config_relative, example_config(serve), overwrite=False)),
    ]
    for relative, what in done:
        click.echo(f"{what:14} {root / relative}")
    hidden = _under_home(exe, Path(sys.executable))
    if hidden:
        click.echo(
            f"warning: {hidden} is under /home, /root or /run/user, which ProtectHome=yes "
            "hides from the service: install pxepeer elsewhere (e.g. a venv in /opt)",
            err=True,
        )
    click.echo(
        "next, as root:\n"
        f"  {'systemd-sysusers':34} # makes the pxepeer user\n"
        f"  {'editor ' + str(DEFAULT_PATH):34} # at least: interface, trust\n"
        "  systemctl daemon-reload\n"
        "  systemctl enable --now pxepeer\n"
        f"  {'journalctl -u pxepeer -f':34} # log-format = \"json\" for log shippers\n"
        "Run commands that write the cache as its user, e.g.\n"
        "  sudo -u pxepeer pxepeer image add ... --cache-dir /var/lib/pxepeer"
    )
