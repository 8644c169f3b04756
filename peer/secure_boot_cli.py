"""`pxepeer secure-boot sign-ipxe` and `image add --uki`: an organisation's own Secure
Boot key over iPXE and the imager (issue 9, point 2).

A site whose PCs carry the organisation's certificate in db signs iPXE with that key
(sbsign) and adds the imager as a unified kernel image signed with it (imaging/uki.py);
`pxepeer serve --secure-boot org --secure-boot-dir DIR` hands UEFI x64 PXE clients the
signed iPXE, which chains the signed UKI: the firmware checks kernel, initrd and
command line alike. Errors are one line, exit 2, and leave no file half-written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from imaging.sb_sign import PASSPHRASE_ENV, SbSigner, SbSignError, read_passphrase, verify
from imaging.uki import DEFAULT_STUB, UkiError, build_signed_uki, os_release
from pxe.secure_boot import ORG_FIRST_STAGES

F = TypeVar("F", bound=Callable[..., Any])


class SecureBootCliError(click.ClickException):
    exit_code = 2


def _signer(key: Path | None, cert: Path | None, pass_file: Path | None) -> SbSigner:
    if key is None or cert is None:
        raise SecureBootCliError("signing needs both --sb-key and --sb-cert")
    try:
        return SbSigner.load(key, cert, read_passphrase(pass_file))
    except SbSignError as exc:
        raise SecureBootCliError(str(exc)) from None


def signing_options(func: F) -> F:
    """--sb-key, --sb-cert and --sb-pass-file, shared by sign-ipxe and image add --uki."""
    for option in reversed(
        [
            click.option(
                "--sb-key",
                type=click.Path(dir_okay=False, path_type=Path),
                help="The organisation's Secure Boot signing key (PEM; may be "
                "passphrase-protected).",
            ),
            click.option(
                "--sb-cert",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Its certificate (PEM), the one enrolled in the PCs' db.",
            ),
            click.option(
                "--sb-pass-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help=f"A file whose first line is the key's passphrase (else "
                f"${PASSPHRASE_ENV}). The key is decrypted in memory only.",
            ),
        ]
    ):
        func = option(func)
    return func


def uki_options(func: F) -> F:
    """`image add` options for an imager or Linux image as a signed unified kernel image."""
    func = signing_options(func)
    func = click.option(
        "--uki-stub",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_STUB,
        show_default=True,
        help="systemd's EFI stub (Debian's systemd-boot-efi) the UKI is built on.",
    )(func)
    func = click.option(
        "--uki",
        is_flag=True,
        help="Store --kernel, --initrd and --cmdline as one unified kernel image signed "
        "with --sb-key (for serve --secure-boot org): the firmware checks all three.",
    )(func)
    return func


def signed_uki(
    name: str,
    version: str,
    kernel: Path | None,
    initrd: Path | None,
    cmdline: str,
    stub: Path,
    sb_key: Path | None,
    sb_cert: Path | None,
    sb_pass_file: Path | None,
) -> Path:
    """The signed UKI for `image add --uki`, in a temporary directory removed when the
    command ends (whether it succeeds or not)."""
    if kernel is None or initrd is None:
        raise SecureBootCliError("--uki needs --kernel and --initrd")
    if "pxepeer.server=" in cmdline:
        # Signed once for every peer: a server named here would pin the imager to one.
        click.echo(
            "pxepeer: warning: --cmdline names pxepeer.server: every machine booting this "
            "UKI will use that server (without it the imager finds its server itself)",
            err=True,
        )
    signer = _signer(sb_key, sb_cert, sb_pass_file)
    ctx = click.get_current_context()
    tmp = Path(ctx.with_resource(tempfile.TemporaryDirectory(prefix="pxepeer-uki-")))
    output = tmp / f"{name}.efi"
    try:
        build_signed_uki(kernel, initrd, cmdline, output, signer,
                         osrel=os_release(name, version), stub=stub)  # fmt: skip
        ok, said = verify(output, signer.cert_path)
    except (UkiError, SbSignError) as exc:
        raise SecureBootCliError(str(exc)) from None
    if not ok:
        raise SecureBootCliError(f"the signed UKI does not verify against --sb-cert: {said}")
    return output


@click.group("secure-boot")
def secure_boot() -> None:
    """Secure Boot with the organisation's own key (serve --secure-boot org)."""


@secure_boot.command("sign-ipxe")
@signing_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the signed copies go (serve --secure-boot-dir).")  # fmt: skip
@click.option("--ipxe-dir", type=click.Path(file_okay=False, path_type=Path),
              default="/usr/lib/ipxe", show_default=True,
              help="Debian's iPXE builds (apt-get install ipxe).")  # fmt: skip
def sign_ipxe(
    sb_key: Path | None,
    sb_cert: Path | None,
    sb_pass_file: Path | None,
    out_dir: Path,
    ipxe_dir: Path,
) -> None:
    """Sign Debian's UEFI x64 iPXE builds (snponly.efi, ipxe.efi) with --sb-key into OUT,
    for `pxepeer serve --secure-boot org --secure-boot-dir OUT`."""
    signer = _signer(sb_key, sb_cert, sb_pass_file)
    sources = [ipxe_dir / n for n in ORG_FIRST_STAGES if (ipxe_dir / n).is_file()]
    if not sources:
        raise SecureBootCliError(
            f"--ipxe-dir {ipxe_dir} has no {' or '.join(ORG_FIRST_STAGES)} (apt-get install ipxe)"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SecureBootCliError(f"--out {out_dir}: {exc.strerror}") from None
    for source in sources:
        target = out_dir / source.name
        try:
            signer.sign(source, target)
            ok, said = verify(target, signer.cert_path)
        except (SbSignError, OSError) as exc:
            raise SecureBootCliError(str(exc)) from None
        if not ok:
            target.unlink(missing_ok=True)
            raise SecureBootCliError(f"{target} does not verify against --sb-cert: {said}")
        click.echo(f"signed {source} -> {target}")
    click.echo(f"signed by {signer.subject}: serve --secure-boot org --secure-boot-dir {out_dir}")
