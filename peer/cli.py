"""The `pxepeer` command. Subcommands are thin: they check input, call library code and
print. Any bad input ends with one line on stderr and exit code 2, and changes nothing."""

from __future__ import annotations

import json
import re
import stat
import sys
import time
from pathlib import Path

import click

from imaging.builder import build_manifest
from imaging.catalog import MAX_PRIORITY, MAX_REPLICAS, MAX_SERIAL, CatalogError
from imaging.chunking import ChunkingError, file_size
from imaging.manifest import ARCHES, DEFAULT_ARCH, BootSpec, ImageKind, SignedManifest
from imaging.origin_layout import PublishError
from imaging.origin_layout import publish as publish_image
from imaging.signing import (
    DEFAULT_ROLE,
    ROLES,
    KeyFileError,
    PublicKey,
    SignatureError,
    TrustedKeys,
    generate_keypair,
    load_public_key,
    load_signing_key,
)
from peer.control_cli import catalog
from peer.core.machine_records import (
    LocalFileVerifier,
    RecordBook,
    SignedRecord,
    next_assignment,
)
from peer.enroll import enroll
from peer.fleet_cli import fleet
from peer.progress_bar import ProgressBar
from peer.secure_boot_cli import secure_boot, signed_uki, uki_options
from peer.serve import serve
from peer.service_cli import install_service
from peer.store.assignments import known_image_names
from peer.store.content_store import ContentStore, StoreError, normalize_mac
from peer.store.node_identity import IdentityFileError, load_certificate, node_key
from peer.store.record_store import RecordStore
from peer.token_cli import token
from pxe.boot_policy import LOCAL_BOOT

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
PROGRESS_THRESHOLD = 16 * 1024 * 1024  # files smaller than this finish before a bar helps
KNOWN_KEYS_DIR = "keys"  # in the cache: public keys of the publishers that added images here


class CliError(click.ClickException):
    exit_code = 2


class OneLineErrors(click.Group):
    """Click prints usage errors as three lines; pxepeer prints every error as one."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:
            assert exc.ctx is not None
            click.echo(exc.ctx.get_help(), err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("pxepeer: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            message = exc.format_message().strip().splitlines()
            hint = f" (see '{exc.ctx.command_path} --help')" if _is_usage(exc) else ""
            click.echo(f"pxepeer: error: {' '.join(message)}{hint}", err=True)
            sys.exit(exc.exit_code)


def _is_usage(exc: click.ClickException) -> bool:
    return isinstance(exc, click.UsageError) and getattr(exc, "ctx", None) is not None


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PXEPEER_CACHE_DIR",
    default="/var/lib/pxepeer",
    show_default=True,
    help="The content store.",
)


def open_store(cache_dir: Path) -> ContentStore:
    try:
        return ContentStore(cache_dir)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise CliError(
            f"{what} {value!r} must be 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    return value


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pxepeer", prog_name="pxepeer")
def main() -> None:
    """pxepeer: peer-to-peer network boot and OS imaging for sites without a server."""


# -- keys -------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Publisher keys (Ed25519) that sign images."""


@keys.command("new")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="File name stem (default: the role).")
@click.option("--role", type=click.Choice(ROLES), default=DEFAULT_ROLE, show_default=True,
              help="What the key may sign: publisher (images, catalogs), operator (pause, "
              "resume, priority) or enroll (node certificates: site membership).")  # fmt: skip
def keys_new(out_dir: Path, name: str | None, role: str) -> None:
    """Make a key pair: OUT/NAME.key (private, mode 0600) and OUT/NAME.pub (with its role)."""
    name = check_name(name or role, "key name")
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir} exists and is not a directory")
    try:
        private, public = generate_keypair(out_dir, name, role)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    key_id = load_public_key(public).key_id
    click.echo(
        f"private key {private}\npublic key  {public}\nkey id      {key_id}\nrole        {role}"
    )


# -- image ------------------------------------------------------------------------------


@main.group()
def image() -> None:
    """Images in the content store: add, list, verify, remove."""


def _input_file(path: Path, option: str) -> int:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CliError(f"{option}: {path}: no such file") from None
    except OSError as exc:
        raise CliError(f"{option}: {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise CliError(f"{option} {path} is a directory, not a file")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise CliError(f"{option} {path} is not a regular file or block device")
    try:
        size = file_size(path)
    except ChunkingError as exc:
        raise CliError(f"{option}: {exc}") from None
    if size == 0:
        raise CliError(f"{option} {path} is empty")
    return size


def _remember_publisher(store: ContentStore, public: PublicKey) -> None:
    """Keep the signer's public key in the cache so `image verify` can check the
    signature of locally added images without being told the key again."""
    path = store.root / KNOWN_KEYS_DIR / f"{public.key_id}.pub"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(PublicKey(public.raw, "publisher").to_line())


@image.command("add")
@click.argument("name")
@click.option("--kernel", type=click.Path(path_type=Path), help="Linux kernel (bzImage).")
@click.option("--initrd", type=click.Path(path_type=Path), help="Initial ramdisk.")
@click.option("--cmdline", default="", help="Kernel command line.")
@click.option("--disk", type=click.Path(path_type=Path), help="Raw disk image or block device.")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path))
@click.option("--version", "version", default="1", show_default=True)
@click.option(
    "--kind",
    type=click.Choice([k.value for k in ImageKind]),
    help="How it boots (default: linux with --kernel, disk with only --disk).",
)
@uki_options
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCHES)),
    default=DEFAULT_ARCH,
    show_default=True,
    help="The CPU the kernel runs on: machines boot only kernels (and imagers) of their own.",
)
@cache_dir_option
def image_add(
    name: str,
    kernel: Path | None,
    initrd: Path | None,
    cmdline: str,
    disk: Path | None,
    key_path: Path,
    version: str,
    kind: str | None,
    uki: bool,
    uki_stub: Path,
    sb_key: Path | None,
    sb_cert: Path | None,
    sb_pass_file: Path | None,
    arch: str,
    cache_dir: Path,
) -> None:
    """Chunk the image's files into the store and write its signed manifest."""
    check_name(name, "image name")
    check_name(version, "version")
    if any(ord(c) < 32 or ord(c) == 127 for c in cmdline):
        raise CliError("--cmdline must be one line without control characters")
    if kernel is None and disk is None:
        raise CliError("an image needs --kernel (network-booted) or --disk (written to disk)")
    if initrd is not None and kernel is None:
        raise CliError("--initrd needs --kernel")
    image_kind = ImageKind(kind) if kind else (ImageKind.LINUX if kernel else ImageKind.DISK)
    if image_kind in (ImageKind.LINUX, ImageKind.IMAGER, ImageKind.WINPE) and kernel is None:
        raise CliError(f"a {image_kind.value} image needs --kernel")
    if arch != DEFAULT_ARCH and kernel is None:
        # A disk image is written by the imager of the machine's own architecture; what
        # it boots afterwards is its own business.
        raise CliError("--arch names the CPU of a kernel: this image has no --kernel")
    if uki and (disk is not None or image_kind not in (ImageKind.LINUX, ImageKind.IMAGER)):
        raise CliError("--uki makes a linux or imager image of --kernel and --initrd, no --disk")
    files = {
        role: path
        for role, path in (("kernel", kernel), ("initrd", initrd), ("disk", disk))
        if path is not None
    }
    if uki:
        # Kernel, initrd and command line in one PE signed for the organisation's db
        # (imaging/uki.py): the manifest names that one file, and it boots whole.
        _input_file(kernel, "--kernel")  # type: ignore[arg-type]
        if initrd is not None:
            _input_file(initrd, "--initrd")
        files = {"uki": signed_uki(name, version, kernel, initrd, cmdline, uki_stub,
                                   sb_key, sb_cert, sb_pass_file)}  # fmt: skip
    sizes = {role: _input_file(path, f"--{role}") for role, path in files.items()}
    try:
        key = load_signing_key(key_path)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    store = open_store(cache_dir)
    if store.find_images(name, version):
        raise CliError(f"image {name} version {version} is already in the store")

    boot = BootSpec(
        image_kind,
        kernel="kernel" if "kernel" in files else None,
        initrd="initrd" if "initrd" in files else None,
        cmdline=cmdline,
        uki="uki" if "uki" in files else None,
        arch=arch,
    )
    # Made before chunking starts, so the first rate shown counts from the first byte.
    bars = {
        role: ProgressBar(role, size)
        for role, size in sizes.items()
        if size >= PROGRESS_THRESHOLD
    }

    def progress(role: str, done: int, total: int) -> None:
        bar = bars.get(role)
        if bar is None:
            return
        bar.update(done)
        if done >= total:
            bar.finish()

    new_chunks: list[str] = []
    written: str | None = None
    try:
        _remember_publisher(store, key.public_key)
        manifest = build_manifest(
            store, name, version, files, sizes, boot, progress=progress, new_chunks=new_chunks
        )
        signed = SignedManifest.sign(manifest, key)
        written = manifest.manifest_id
        store.put_manifest(signed)
    except BaseException as exc:
        # Leave the store as it was: the chunks this run stored belong to no manifest.
        if written is not None:
            store.remove_manifest(written)
        for sha in new_chunks:
            store.remove_chunk(sha)
        if isinstance(exc, (ChunkingError, StoreError)):
            raise CliError(str(exc)) from None
        if isinstance(exc, OSError):
            raise CliError(f"cannot add image: {exc.strerror or exc}") from None
        raise
    stored = sum(f.stored_size for f in manifest.files)
    click.echo(
        f"added {name} {version}: {manifest.total_size} bytes in {len(manifest.chunk_refs())} "
        f"stored chunks ({stored} bytes), {len(new_chunks)} new; id {manifest.manifest_id}"
    )


def _trusted(store: ContentStore, trust: tuple[Path, ...]) -> TrustedKeys:
    try:
        if trust:
            return TrustedKeys([load_public_key(p) for p in trust])
        known = sorted((store.root / KNOWN_KEYS_DIR).glob("*.pub"))
        return TrustedKeys([load_public_key(p) for p in known])
    except KeyFileError as exc:
        raise CliError(str(exc)) from None


def _select(store: ContentStore, name: str, version: str | None) -> list[SignedManifest]:
    found = store.find_images(name, version)
    if not found:
        what = f"{name} version {version}" if version else name
        raise CliError(f"no image {what} in {store.root}")
    return found


@image.command("list")
@click.option("--trust", multiple=True, type=click.Path(path_type=Path), metavar="PUBKEY")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@cache_dir_option
def image_list(trust: tuple[Path, ...], as_json: bool, cache_dir: Path) -> None:
    """Images in the store, with their completeness and who signed them."""
    store = open_store(cache_dir)
    trusted = _trusted(store, trust)
    rows = []
    docs = []
    for signed in sorted(
        store.signed_manifests(), key=lambda s: (s.manifest.name, s.manifest.created)
    ):
        m = signed.manifest
        try:
            signer = signed.verify(trusted)
        except SignatureError:
            signer = "UNTRUSTED"
        refs = m.chunk_refs()
        have = len(refs) - len(store.missing_chunks(m))
        docs.append(
            {
                "name": m.name,
                "version": m.version,
                "kind": m.boot.kind.value,
                "arch": m.boot.arch,
                "size": m.total_size,
                "chunks": len(refs),
                "chunks_held": have,
                "signer": None if signer == "UNTRUSTED" else signer,
                "manifest_id": m.manifest_id,
                "created": m.created,
            }
        )
        rows.append(
            (
                m.name,
                m.version,
                # The CPU only where it is not the default: `imager/arm64`.
                m.boot.kind.value + ("" if m.boot.arch == DEFAULT_ARCH else f"/{m.boot.arch}"),
                f"{m.total_size / 2**20:.1f}MiB",
                f"{have}/{len(refs)}",
                signer,
                m.manifest_id[:12],
            )
        )
    if as_json:
        click.echo(json.dumps(docs, indent=1))
        return
    if not rows:
        click.echo(f"no images in {store.root}")
        return
    header = ("NAME", "VERSION", "KIND", "SIZE", "CHUNKS", "SIGNER", "ID")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@image.command("verify")
@click.argument("name")
@click.option("--version", "version", default=None)
@click.option("--trust", multiple=True, type=click.Path(path_type=Path), metavar="PUBKEY")
@cache_dir_option
def image_verify(name: str, version: str | None, trust: tuple[Path, ...], cache_dir: Path) -> None:
    """Check the signature and re-hash every chunk of an image (damaged ones are removed).

    Exits 1 when the image is not intact."""
    store = open_store(cache_dir)
    trusted = _trusted(store, trust)
    intact = True
    for signed in _select(store, name, version):
        m = signed.manifest
        title = f"{m.name} {m.version} ({m.manifest_id[:12]})"
        try:
            signer = signed.verify(trusted)
            click.echo(f"{title}: signature good, key {signer}")
        except SignatureError as exc:
            click.echo(f"{title}: signature BAD: {exc}")
            intact = False
        refs = m.chunk_refs()
        total = sum(r.size for r in refs)
        bar = ProgressBar("verify", total) if total >= PROGRESS_THRESHOLD else None
        done = 0

        def tick(ref, bar=bar) -> None:
            nonlocal done
            done += ref.size
            if bar is not None:
                bar.update(done)

        problems = store.verify_image(m, tick)
        if bar is not None:
            bar.finish()
        if problems:
            intact = False
            for p in problems[:10]:
                click.echo(f"{title}: chunk {p.sha256[:16]} {p.problem}")
            click.echo(f"{title}: {len(problems)} of {len(refs)} chunks missing or corrupt")
        else:
            click.echo(f"{title}: all {len(refs)} chunks verified ({total} bytes)")
    if not intact:
        sys.exit(1)


@image.command("remove")
@click.argument("name")
@click.option("--version", "version", default=None)
@cache_dir_option
def image_remove(name: str, version: str | None, cache_dir: Path) -> None:
    """Remove an image's manifest and the chunks no other image uses."""
    store = open_store(cache_dir)
    doomed = _select(store, name, version)
    doomed_ids = {s.manifest.manifest_id for s in doomed}
    keep = {
        ref.sha256
        for s in store.signed_manifests()
        if s.manifest.manifest_id not in doomed_ids
        for ref in s.manifest.chunk_refs()
    }
    for signed in doomed:
        store.remove_manifest(signed.manifest.manifest_id)
        freed = [r for r in signed.manifest.chunk_refs() if r.sha256 not in keep]
        for ref in freed:
            store.remove_chunk(ref.sha256)
        click.echo(
            f"removed {signed.manifest.name} {signed.manifest.version} ({len(freed)} chunks freed)"
        )


# -- assign -----------------------------------------------------------------------------


@main.command()
@click.argument("mac", required=False)
@click.argument("image_name", metavar="IMAGE", required=False)
@click.option("--again", is_flag=True,
              help="Image the machine again even if it is already imaged with IMAGE.")
@click.option("--clear", is_flag=True, help="Remove MAC's assignment.")
@click.option("--list", "list_all", is_flag=True, help="Show all assignments.")
@click.option("--url", default=None, metavar="http://PEER:PORT",
              help="Assign through a peer's API instead of this machine's store.")  # fmt: skip
@click.option("--token", envvar="PXEPEER_TOKEN", default=None,
              help="API token for --url (technician or operator; viewer for --list).")  # fmt: skip
@cache_dir_option
def assign(mac: str | None, image_name: str | None, again: bool, clear: bool, list_all: bool,
           url: str | None, token: str | None, cache_dir: Path) -> None:  # fmt: skip
    """Make machine MAC boot IMAGE without a keypress (or --clear, --list).

    IMAGE may be `local` to make the machine boot its own disk without a menu. The
    assignment is a record signed by this peer and replicated to every peer of the site:
    run it on any of them. A disk image is written once per assignment; the machine
    then boots its disk until it is assigned again (--again re-images it)."""
    if list_all:
        if mac or image_name or clear or again:
            raise CliError("--list takes no other arguments")
        if url is not None:
            _list_remote(url, token)
            return
        _list_machines(cache_dir)
        return
    if mac is None:
        raise CliError("give MAC IMAGE, MAC --clear or --list")
    if clear and (image_name or again):
        raise CliError("--clear takes only a MAC")
    if not clear and image_name is None:
        raise CliError("give the IMAGE to assign (or --clear)")
    try:
        mac = normalize_mac(mac)  # checked before the store is touched
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if url is not None:
        _assign_remote(url, token, mac, None if clear else image_name, again)
        return
    store = open_store(cache_dir)
    if image_name is not None and image_name != LOCAL_BOOT:
        check_name(image_name, "image name")
        if image_name not in known_image_names(store):
            raise CliError(f"no image {image_name} in {store.root} or in the site's catalog")
    try:
        key = node_key(store.state_dir)
        assert key is not None
        cert = load_certificate(store.state_dir, key)
    except IdentityFileError as exc:
        raise CliError(str(exc)) from None
    records = RecordStore(store.state_dir, LocalFileVerifier(key.public_key))
    book = RecordBook()
    try:
        records.load(book)
        record = next_assignment(book, mac, None if clear else image_name, again,
                                 int(time.time()), key.key_id)  # fmt: skip
        if record is None:
            state = book.machine(mac)
            if clear:
                click.echo(f"{mac}: was not assigned")
            elif state.imaged_for_assignment:
                click.echo(f"{mac} -> {image_name}: already imaged; it boots its disk "
                           f"(pxepeer assign {mac} {image_name} --again re-images it)")  # fmt: skip
            else:
                click.echo(f"{mac} -> {image_name} (already assigned)")
            return
        signed = SignedRecord.sign(record, key)
        certs = {key.key_id: cert.to_bytes()} if cert is not None else {}
        records.add(book, [signed], certs)
    except OSError as exc:
        raise CliError(f"cannot write the machine records in {store.state_dir}: {exc}") from None
    if clear:
        click.echo(f"{mac}: cleared")
    else:
        again_note = " (again: it will be imaged on its next network boot)" if again else ""
        click.echo(f"{mac} -> {image_name}{again_note}")


def _remote(url: str | None, token: str | None) -> str:
    from peer.api_client import RemoteError, check_url

    if url is None or not token:
        raise CliError("--url needs --token (or PXEPEER_TOKEN): pxepeer token new on the peer")
    try:
        return check_url(url)
    except RemoteError as exc:
        raise CliError(str(exc)) from None


def _assign_remote(url: str | None, token: str | None, mac: str, image_name: str | None,
                   again: bool) -> None:  # fmt: skip
    """POST /v1/assignments on the peer at `url` (peer/api/assign_api.py)."""
    from peer.api_client import RemoteError, call

    base = _remote(url, token)
    assert token is not None
    if image_name is not None and image_name != LOCAL_BOOT:
        check_name(image_name, "image name")
    try:
        answer = call(base, token, "POST", "/v1/assignments",
                      {"mac": mac, "image": image_name, "again": again})  # fmt: skip
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    click.echo(str(answer.get("message", answer)))


def _list_remote(url: str | None, token: str | None) -> None:
    from peer.api_client import RemoteError, call

    base = _remote(url, token)
    assert token is not None
    try:
        answer = call(base, token, "GET", "/v1/assignments")
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    for item in answer.get("assignments", []):
        click.echo(f"{item.get('mac')}  {item.get('image')}")


def _list_machines(cache_dir: Path) -> None:
    store = open_store(cache_dir)
    key = node_key(store.state_dir)
    assert key is not None
    book = RecordBook()
    RecordStore(store.state_dir, LocalFileVerifier(key.public_key)).load(book)
    disks = {m.manifest.name for m in store.signed_manifests()
             if m.manifest.boot.kind is ImageKind.DISK}  # fmt: skip
    for state in book.machines():
        if state.assigned is None:
            continue
        imaged = state.imaged
        how = ""
        if state.imaged_for_assignment and imaged is not None:
            how = f"imaged with {imaged.image}"
        elif state.assigned in disks:
            how = "to be imaged"
        click.echo(f"{state.mac}  {state.assigned}  {how}".rstrip())


# -- publish ----------------------------------------------------------------------------


@main.command()
@click.argument("image_name", metavar="IMAGE")
@click.option("--to", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory a web server, CDN or S3 sync serves as the origin.")  # fmt: skip
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path))
@click.option("--version", "version", default=None, help="Default: the newest in the store.")
@click.option("--priority", type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY), default=0,
              show_default=True, help="Higher goes first.")  # fmt: skip
@click.option("--paused/--active", default=False, help="Publish paused (sites do not fetch it).")
@click.option("--replicas", type=click.IntRange(0, MAX_REPLICAS), default=0, show_default=True,
              help="Peers per site that hold it; 0 = every peer.")  # fmt: skip
@click.option("--expires-in", type=click.IntRange(60, 10 * 365 * 86400), default=7 * 86400,
              show_default=True, help="Seconds until the catalog expires.")  # fmt: skip
@click.option("--serial", type=click.IntRange(1, MAX_SERIAL), default=None,
              help="Catalog serial to use, above any the peers saw: continues a lost or "
                   "unreadable origin. Default: one above the origin's.")  # fmt: skip
@cache_dir_option
def publish(
    image_name: str,
    out_dir: Path,
    key_path: Path,
    version: str | None,
    priority: int,
    paused: bool,
    replicas: int,
    expires_in: int,
    serial: int | None,
    cache_dir: Path,
) -> None:
    """Put IMAGE from the store on an origin directory and sign a new catalog.

    The catalog's serial is always above the one the origin holds (peers refuse a lower
    one as a rollback), whoever signed it and even if it expired."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--to {out_dir} exists and is not a directory")
    store = open_store(cache_dir)
    found = _select(store, image_name, version)
    signed = max(found, key=lambda s: s.manifest.created)
    try:
        key = load_signing_key(key_path)
        signed.verify(TrustedKeys([key.public_key]))
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    except SignatureError:
        raise CliError(
            f"{image_name} was not signed by {key_path}: the catalog and the manifest must "
            "come from the same publisher"
        ) from None
    missing = store.missing_chunks(signed.manifest)
    if missing:
        raise CliError(f"{image_name}: {len(missing)} chunks are missing from the store")
    try:
        catalog = publish_image(
            out_dir, signed, store.read_chunk, key,
            priority=priority, paused=paused, replicas=replicas, lifetime=expires_in,
            serial=serial,
        )  # fmt: skip
    except (PublishError, CatalogError, StoreError) as exc:
        raise CliError(str(exc)) from None
    m = signed.manifest
    click.echo(
        f"published {m.name} {m.version} ({m.manifest_id[:12]}) to {out_dir}: "
        f"catalog serial {catalog.serial}, {len(catalog.entries)} image(s), "
        f"expires in {expires_in} s"
    )


# -- status -----------------------------------------------------------------------------


@main.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True,
              help="Any peer's HTTP address.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@click.option("--token", envvar="PXEPEER_TOKEN", default=None,
              help="A viewer token, for a peer that is not on this machine's loopback.")
@click.option("--site-wide", is_flag=True,
              help="Ask every live peer of the site too: one row per peer from its own "
                   "status (peer/site_wide.py).")  # fmt: skip
def status(url: str, as_json: bool, token: str | None, site_wide: bool) -> None:
    """Show the site as one peer sees it: peers, responder, images per peer, WAN vs LAN."""
    from peer.core.fleet_targets import base_url
    from peer.remote_status import StatusError, fetch_status
    from peer.status_view import render_status

    try:
        base = base_url(url, allow_path=not site_wide)  # a proxy's prefix for one peer
        if site_wide:
            from peer.site_wide import as_json as rows_json
            from peer.site_wide import gather, render_site

            rows = gather(base, token)
            click.echo(json.dumps(rows_json(rows), indent=1) if as_json else render_site(rows))
            return
        doc = fetch_status(base, token)
    except ValueError as exc:
        raise CliError(f"--url {exc}") from None
    except StatusError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    try:
        click.echo(render_status(doc))
    except (KeyError, TypeError, ValueError, AttributeError):
        # A remote answer is not ours to trust: a malformed one is one line, not a trace.
        raise CliError(f"{base}/v1/status: not a status document this pxepeer can show") from None


main.add_command(serve)
main.add_command(secure_boot)
main.add_command(enroll)
main.add_command(token)
main.add_command(install_service)
main.add_command(catalog)
main.add_command(fleet)


if __name__ == "__main__":
    main(prog_name="pxepeer")
