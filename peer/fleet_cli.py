"""`pxepeer fleet targets`: the Prometheus file_sd file listing every live peer of every
site in an inventory, labelled by site (docs/operations.md, docs/fleet/).

Run it from cron or a systemd timer next to Prometheus: it asks a known peer of each site
for its status (several sites at once, each request bounded in time and size), and
replaces the file atomically, so Prometheus (which re-reads file_sd files when they
change) never sees half of it. The decisions are peer/core/fleet_targets.py's.

Exit status: 0 every site answered; 1 the file was written but some site kept its
previous targets (or had none), each named on stderr; 2 bad input, nothing written.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from peer.core.fleet_targets import Site, SiteResult

# peer/core/fleet_targets.py and the HTTP client are imported when a fleet command runs:
# every other command's start-up stays as it was.

MAX_TOKEN_FILE = 4096
WORKERS = 32


class FleetCliError(click.ClickException):
    exit_code = 2


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """--token, else the first line of --token-file, else PXEPEER_TOKEN (or none: a peer
    on loopback, or one started with its API open, needs none)."""
    if token and token_file:
        raise FleetCliError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            with open(token_file, "rb") as f:
                data = f.read(MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise FleetCliError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        lines = data.decode("utf-8", "replace").strip().splitlines()
        if len(data) > MAX_TOKEN_FILE or not lines:
            raise FleetCliError(f"--token-file {token_file}: want one token on one line")
        token = lines[0].strip()
    token = token or os.environ.get("PXEPEER_TOKEN") or None
    if token is not None and (not token.isprintable() or " " in token or len(token) > 512):
        raise FleetCliError("the token is not one printable word")
    return token


def ask_site(site: Site, token: str | None, timeout: float) -> SiteResult:
    """The first known peer of `site` that answers with a usable status gives its peers."""
    from peer.core.fleet_targets import BadAnswer, SiteResult, status_targets
    from peer.remote_status import StatusError, fetch_status

    failures = []
    for base in site.peers:
        try:
            targets, skipped = status_targets(fetch_status(base, token, timeout), base)
        except (StatusError, BadAnswer) as exc:
            failures.append(str(exc))
            continue
        for reason in skipped:
            click.echo(f"site {site.name}: {base} listed a peer we skip ({reason})", err=True)
        return SiteResult(site, targets)
    return SiteResult(site, None, "no known peer answered (" + "; ".join(failures) + ")")


@click.group()
def fleet() -> None:
    """Watch many sites from one Prometheus (docs/operations.md)."""


@fleet.command()
@click.option("--inventory", "inventory", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="TOML: [sites.NAME] peers = [\"http://PEER:8080\", ...].")  # fmt: skip
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file_sd JSON file Prometheus reads (replaced atomically).")  # fmt: skip
@click.option("--token", default=None, help="A viewer token the peers accept.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding the viewer token (also PXEPEER_TOKEN).")  # fmt: skip
@click.option("--timeout", default=5.0, show_default=True,
              type=click.FloatRange(0.1, 120.0),
              help="Seconds for one peer's whole answer.")  # fmt: skip
def targets(inventory: Path, out: Path, token: str | None, token_file: Path | None,
            timeout: float) -> None:  # fmt: skip
    """Write Prometheus' file_sd targets: every live peer of every site, labelled site=NAME.

    A site none of whose known peers answers keeps the targets the last run wrote (said on
    stderr, exit status 1), so its `up` series shows the outage instead of vanishing.
    """
    from imaging.durable import write_atomic
    from peer.core.fleet_targets import (
        MAX_INVENTORY_BYTES,
        FleetInputError,
        merge,
        parse_inventory,
        read_previous,
        render,
    )

    secret = read_token(token, token_file)
    try:
        with open(inventory, "rb") as f:
            raw = f.read(MAX_INVENTORY_BYTES + 1)
        if len(raw) > MAX_INVENTORY_BYTES:
            raise FleetCliError(f"--inventory {inventory}: over {MAX_INVENTORY_BYTES} bytes")
        sites = parse_inventory(raw.decode("utf-8"))
    except OSError as exc:
        raise FleetCliError(f"--inventory {inventory}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FleetCliError(f"--inventory {inventory}: not UTF-8") from None
    except FleetInputError as exc:
        raise FleetCliError(f"--inventory {inventory}: {exc}") from None
    try:
        with open(out, "rb") as f:
            previous = read_previous(f.read())
    except FileNotFoundError:
        previous = {}
    except OSError as exc:
        raise FleetCliError(f"--out {out}: {exc.strerror or exc}") from None
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(sites))) as pool:
        results = list(pool.map(lambda s: ask_site(s, secret, timeout), sites))
    groups, notes = merge(results, previous)
    try:
        write_atomic(out, render(groups))
    except OSError as exc:
        raise FleetCliError(f"--out {out}: {exc.strerror or exc}") from None
    for note in notes:
        click.echo(note, err=True)
    peers = sum(len(g["targets"]) for g in groups)  # type: ignore[arg-type]
    click.echo(f"{out}: {peers} peer(s) of {len(groups)} site(s)")
    if notes:
        sys.exit(1)
