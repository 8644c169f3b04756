"""`pxepeer catalog set`: pause, resume or reprioritise an image without publishing.

    pxepeer catalog set IMAGE --paused --key OPERATOR_KEY --to ORIGIN
        every site: a signed control document (imaging/control.py) beside the catalog
    pxepeer catalog set IMAGE --paused --url http://PEER:8080 --token T
        this site (store) only: an override through any of its peers' API
        (peer/api/override_api.py), a record every peer of the site takes

Bad input ends with one line on stderr and exit code 2, and changes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from imaging.catalog import MAX_PRIORITY, CatalogError
from imaging.control import ControlSetError, set_image
from imaging.doc_fields import TOKEN
from imaging.origin_layout import CATALOG, read_catalog
from imaging.signing import KeyFileError, load_public_key, load_signing_key


class CliError(click.ClickException):
    exit_code = 2


@click.group("catalog")
def catalog() -> None:
    """Change what sites fetch without publishing: pause, resume, priority."""


def _describe(paused: bool | None, priority: int | None) -> str:
    parts = []
    if paused is not None:
        parts.append("paused" if paused else "active")
    if priority is not None:
        parts.append(f"priority {priority}")
    return ", ".join(parts)


@catalog.command("set")
@click.argument("image_name", metavar="IMAGE")
@click.option("--paused", is_flag=True,
              help="Sites stop fetching IMAGE (what is held stays bootable).")  # fmt: skip
@click.option("--active", is_flag=True, help="Sites fetch IMAGE again.")
@click.option("--priority", type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY), default=None,
              help="Higher goes first.")  # fmt: skip
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None,
              help="Operator (or publisher) private key that signs the control document.")
@click.option("--to", "origin", type=click.Path(path_type=Path), default=None,
              help="The origin directory `pxepeer publish --to` writes.")  # fmt: skip
@click.option("--url", default=None, metavar="http://PEER:PORT",
              help="Instead: override IMAGE for this site only, through a peer's API.")  # fmt: skip
@click.option("--token", envvar="PXEPEER_TOKEN", default=None,
              help="Operator API token for --url.")  # fmt: skip
@click.option("--clear", is_flag=True,
              help="With --url: remove the site's override of IMAGE.")  # fmt: skip
def catalog_set(image_name: str, paused: bool, active: bool, priority: int | None,
                key_path: Path | None, origin: Path | None, url: str | None,
                token: str | None, clear: bool) -> None:  # fmt: skip
    """Pause IMAGE, make it active again or give it a priority, for every site (--key,
    --to: a signed control document on the origin, which peers take from an operator
    or publisher key they trust) or for one site, the store of the peer at --url
    (--token: an operator token; every peer of the site follows it)."""
    if not TOKEN.fullmatch(image_name):
        raise CliError(
            f"image name {image_name!r} must be 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    if paused and active:
        raise CliError("--paused and --active exclude each other")
    wanted_paused = True if paused else False if active else None
    remote = url is not None
    if remote and (key_path is not None or origin is not None):
        raise CliError("--url (this site only) and --key/--to (every site) exclude each other")
    if clear:
        if not remote:
            raise CliError("--clear removes a site's override: give --url and --token")
        if wanted_paused is not None or priority is not None:
            raise CliError("--clear takes no --paused, --active or --priority")
    elif wanted_paused is None and priority is None:
        raise CliError("give --paused, --active or --priority N")
    if remote:
        _set_remote(url, token, image_name, wanted_paused, priority, clear)
        return
    if key_path is None or origin is None:
        raise CliError("give --key OPERATOR_KEY --to ORIGIN (or --url PEER --token T)")
    _set_origin(image_name, wanted_paused, priority, key_path, origin)


def _set_origin(name: str, paused: bool | None, priority: int | None, key_path: Path,
                origin: Path) -> None:  # fmt: skip
    if not origin.is_dir():
        raise CliError(f"--to {origin} is not a directory (the origin `pxepeer publish` writes)")
    try:
        key = load_signing_key(key_path)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    public = key_path.with_suffix(".pub")
    if public.is_file():
        try:
            role = load_public_key(public).role
        except KeyFileError:
            role = None
        if role == "enroll":
            raise CliError(
                f"{key_path} is an enroll key: peers take control documents only from "
                "operator or publisher keys (pxepeer keys new --role operator)"
            )
    try:
        held = read_catalog(origin)
    except (CatalogError, OSError) as exc:
        raise CliError(f"cannot read {origin / CATALOG}: {exc}") from None
    if held is None or held.catalog.entry(name) is None:
        raise CliError(f"no image {name} in the catalog at {origin}: publish it first")
    try:
        control = set_image(origin, name, key, paused=paused, priority=priority,
                            now=int(time.time()))  # fmt: skip
    except ControlSetError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot lock or write {origin}: {exc.strerror or exc}") from None
    click.echo(
        f"{name}: {_describe(paused, priority)} in control serial {control.serial} at {origin} "
        f"(signed by key {key.key_id}, {len(control.entries)} image(s), expires "
        f"{time.strftime('%Y-%m-%d', time.gmtime(control.expires))})"
    )


def _set_remote(url: str | None, token: str | None, name: str, paused: bool | None,
                priority: int | None, clear: bool) -> None:  # fmt: skip
    """PUT (or DELETE) /v1/overrides/NAME on the peer at `url`."""
    from peer.api_client import RemoteError, call, check_url

    if url is None or not token:
        raise CliError("--url needs --token (or PXEPEER_TOKEN): an operator token, "
                       "pxepeer token new --role operator on the peer")  # fmt: skip
    try:
        base = check_url(url)
        if clear:
            answer = call(base, token, "DELETE", f"/v1/overrides/{name}")
        else:
            doc: dict[str, object] = {}
            if paused is not None:
                doc["paused"] = paused
            if priority is not None:
                doc["priority"] = priority
            answer = call(base, token, "PUT", f"/v1/overrides/{name}", doc)
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    effective = answer.get("effective")
    now = ""
    if isinstance(effective, dict):
        now = (f"; now {'paused' if effective.get('paused') else 'active'} "
               f"({effective.get('paused_by')}), priority {effective.get('priority')} "
               f"({effective.get('priority_by')})")  # fmt: skip
    if clear:
        what = "override removed" if answer.get("changed") else "had no override"
    else:
        what = f"{_describe(paused, priority)} for this site (site override)"
    click.echo(f"{name}: {what}{now}")
