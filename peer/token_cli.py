"""`pxepeer token new|add|list|revoke`: bearer tokens for a peer's HTTP API, kept hashed in
the store (peer/store/tokens.py). A running daemon sees a new or revoked token at its
next request; no restart.

The store modules are imported when a token command runs, not when `pxepeer` starts:
every other command's start-up stays as it was."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from peer.store.tokens import TokenStore

ROLE_NAMES = ("viewer", "technician", "operator")  # peer/core/api_access.py's, lowest first
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")


class TokenCliError(click.ClickException):
    exit_code = 2


_cache_dir = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PXEPEER_CACHE_DIR",
    default="/var/lib/pxepeer",
    show_default=True,
    help="The content store of the peer the token is for.",
)


def _tokens(cache_dir: Path) -> TokenStore:
    from peer.store.content_store import ContentStore, StoreError
    from peer.store.tokens import TokenStore

    try:
        return TokenStore(ContentStore(cache_dir).state_dir)
    except StoreError as exc:
        raise TokenCliError(str(exc)) from None


@click.group()
def token() -> None:
    """Bearer tokens for the HTTP API (viewer < technician < operator)."""


@token.command("new")
@click.option("--role", type=click.Choice(ROLE_NAMES), required=True,
              help="viewer: status, /metrics, dashboard; technician: also assign machines; "
              "operator: everything, site-local pause and priority too.")  # fmt: skip
@click.option("--name", default=None,
              help="Who holds it, e.g. alice or prometheus (default: ROLE-ID).")  # fmt: skip
@_cache_dir
def token_new(role: str, name: str | None, cache_dir: Path) -> None:
    """Make a token and print it (once: only its hash is kept)."""
    if name is not None and not NAME.match(name):
        raise TokenCliError(f"token name {name!r} must be 1-64 letters, digits, '.', '_', "
                            "'@', '+' or '-', starting with a letter or digit")  # fmt: skip
    from peer.core.api_access import Role
    from peer.store.tokens import TokenError

    store = _tokens(cache_dir)
    try:
        secret, entry = store.create(Role.parse(role), name)
    except TokenError as exc:
        raise TokenCliError(str(exc)) from None
    click.echo(secret)
    click.echo(f"token {entry.name} ({role}, id {entry.token_id}): shown once, keep it secret",
               err=True)  # fmt: skip


@token.command("add")
@click.option("--role", type=click.Choice(ROLE_NAMES), required=True)
@click.option("--name", required=True, help="Who holds it, e.g. prometheus.")
@click.option("--token-file", type=click.File("r"), required=True,
              help="A file holding the token ('-': standard input), never the command line.")
@_cache_dir
def token_add(role: str, name: str, token_file, cache_dir: Path) -> None:
    """Accept a token made on another store, so one credential (a fleet Prometheus's,
    an operator's) works at every store it is added to."""
    if not NAME.match(name):
        raise TokenCliError(f"token name {name!r} must be 1-64 letters, digits, '.', '_', "
                            "'@', '+' or '-', starting with a letter or digit")  # fmt: skip
    from peer.core.api_access import Role
    from peer.store.tokens import TokenError

    text = token_file.read(4096).strip()
    try:
        entry = _tokens(cache_dir).add(Role.parse(role), name, text)
    except TokenError as exc:
        raise TokenCliError(str(exc)) from None
    click.echo(f"added {entry.name} ({role}, id {entry.token_id})")


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@_cache_dir
def token_list(as_json: bool, cache_dir: Path) -> None:
    """The tokens this store issued (ids, roles, names; never the tokens)."""
    from peer.store.tokens import TokenError

    store = _tokens(cache_dir)
    try:
        entries = store.entries()
    except TokenError as exc:
        raise TokenCliError(str(exc)) from None
    docs = [{"id": e.token_id, "role": e.role.label, "name": e.name, "created": e.created}
            for e in entries]  # fmt: skip
    if as_json:
        click.echo(json.dumps(docs, indent=1))
        return
    if not docs:
        state = "the API is closed to anyone without one" if store.path.exists() else (
            "the API is open (no token was ever issued)")  # fmt: skip
        click.echo(f"no tokens; {state}")
        return
    click.echo(f"{'ID':12}  {'ROLE':10}  {'CREATED':20}  NAME")
    for d in docs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["created"]))
        click.echo(f"{d['id']:12}  {d['role']:10}  {created:20}  {d['name']}")


@token.command("revoke")
@click.argument("which", metavar="NAME|ID")
@_cache_dir
def token_revoke(which: str, cache_dir: Path) -> None:
    """Revoke a token: refused from the daemon's next request on."""
    from peer.store.tokens import TokenError

    try:
        entry = _tokens(cache_dir).revoke(which)
    except TokenError as exc:
        raise TokenCliError(str(exc)) from None
    click.echo(f"revoked {entry.name} ({entry.role.label}, id {entry.token_id})")
