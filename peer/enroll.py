"""`pxepeer enroll`: give this endpoint its node identity and a certificate from an enroll
key, directly or through a signing request the enroll key's holder answers elsewhere.

    pxepeer enroll --key ENROLL_KEY [--name LABEL] --cache-dir C     (key on this machine)
    pxepeer enroll --request [--name LABEL] --cache-dir C [--out F]  (endpoint: ask)
    pxepeer enroll --sign REQUEST --key ENROLL_KEY [--out F]          (admin: answer)
    pxepeer enroll --certificate FILE --cache-dir C                  (endpoint: install)

The node key is made once and kept (peer/store/node_identity.py): enrolling again keeps
the node id.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import click

from imaging.durable import write_atomic
from imaging.signing import (
    KeyFileError,
    PublicKey,
    SigningKey,
    load_public_key,
    load_signing_key,
)
from peer.core.identity import (
    MAX_CERT_BYTES,
    EnrollRequest,
    IdentityError,
    NodeCertificate,
    check_label,
)
from peer.store.content_store import ContentStore, StoreError
from peer.store.node_identity import (
    IdentityFileError,
    install_certificate,
    load_certificate,
    node_key,
)


class EnrollUsageError(click.ClickException):
    exit_code = 2


def _default_label() -> str:
    return re.sub(r"[^\x20-\x7e]", "?", socket.gethostname())[:64]


def _enroll_key(path: Path) -> SigningKey:
    """The enroll key; refused when its public half says it is for something else."""
    try:
        key = load_signing_key(path)
    except KeyFileError as exc:
        raise EnrollUsageError(str(exc)) from None
    public = path.with_suffix(".pub")
    if public.exists():
        try:
            recorded = load_public_key(public)
        except KeyFileError as exc:
            raise EnrollUsageError(str(exc)) from None
        if recorded.raw == key.public_key.raw and recorded.role != "enroll":
            raise EnrollUsageError(
                f"{path} is a {recorded.role} key ({public} says so); certificates are "
                "signed with an enroll key (pxepeer keys new --role enroll)"
            )
    return key


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_CERT_BYTES + 1)
    except OSError as exc:
        raise EnrollUsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _state_dir(cache_dir: Path) -> Path:
    try:
        return ContentStore(cache_dir).state_dir
    except StoreError as exc:
        raise EnrollUsageError(str(exc)) from None


def _write_new(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, 0o644)
    except OSError as exc:
        raise EnrollUsageError(f"cannot write {path}: {exc.strerror}") from None


@click.command()
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The enroll key (private): sign this endpoint's certificate with it, or "
              "with --sign a request's.")  # fmt: skip
@click.option(
    "--name",
    "label",
    default=None,
    metavar="LABEL",
    help="A label for this endpoint in status and logs (default: the host name).",
)
@click.option(
    "--request",
    "make_request",
    is_flag=True,
    help="Write a signing request for the holder of the enroll key.",
)
@click.option(
    "--sign",
    "request_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="REQUEST",
    help="Answer a signing request with --key (admin side).",
)
@click.option(
    "--certificate",
    "cert_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Install the certificate that answers this endpoint's request.",
)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where --request or --sign writes (default: NODE_ID.request / NODE_ID.cert "
              "in the current directory).")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="PXEPEER_CACHE_DIR", default="/var/lib/pxepeer", show_default=True,
              help="The content store, where the node key and certificate live.")  # fmt: skip
def enroll(key_path: Path | None, label: str | None, make_request: bool,
           request_path: Path | None, cert_path: Path | None, out_path: Path | None,
           cache_dir: Path) -> None:  # fmt: skip
    """Make this endpoint a member of its site: a node key kept in the store and a
    certificate for it signed by an enroll key."""
    modes = [m for m, on in (("--request", make_request), ("--sign", request_path),
                             ("--certificate", cert_path)) if on]  # fmt: skip
    if len(modes) > 1:
        raise EnrollUsageError(f"{' and '.join(modes)} cannot be combined")
    if label is not None:
        try:
            check_label(label)
        except IdentityError:
            raise EnrollUsageError(
                f"--name {label!r}: at most 64 printable ASCII characters"
            ) from None
    if request_path is not None:
        if key_path is None:
            raise EnrollUsageError("--sign needs --key ENROLL_KEY")
        _sign_request(request_path, _enroll_key(key_path), out_path)
        return
    if out_path is not None and not make_request:
        raise EnrollUsageError("--out applies to --request and --sign")
    if cert_path is not None:
        if key_path is not None or label is not None:
            raise EnrollUsageError("--certificate takes only --cache-dir")
        _install(cert_path, cache_dir)
        return
    if make_request:
        if key_path is not None:
            raise EnrollUsageError("--request is for enrolling without the key; drop --key")
        _write_request(cache_dir, label, out_path)
        return
    if key_path is None:
        raise EnrollUsageError(
            "give --key ENROLL_KEY, or --request (then --certificate) to enroll without it"
        )
    enroll_key = _enroll_key(key_path)
    state = _state_dir(cache_dir)
    try:
        key = node_key(state)
        assert key is not None
        previous = load_certificate(state, key)
        cert = NodeCertificate.issue(
            key.public_key,
            label if label is not None else (previous.label if previous else _default_label()),
            int(time.time()),
            enroll_key,
        )
        install_certificate(state, cert)
    except (IdentityFileError, IdentityError) as exc:
        raise EnrollUsageError(str(exc)) from None
    kept = " (identity kept)" if previous is not None else ""
    click.echo(
        f"enrolled node {cert.node_id} ({cert.label or 'no label'}) with enroll key "
        f"{enroll_key.key_id}{kept}"
    )


def _write_request(cache_dir: Path, label: str | None, out_path: Path | None) -> None:
    state = _state_dir(cache_dir)
    try:
        key = node_key(state)
        assert key is not None
        request = EnrollRequest.make(key, label if label is not None else _default_label(),
                                     int(time.time()))  # fmt: skip
    except (IdentityFileError, IdentityError) as exc:
        raise EnrollUsageError(str(exc)) from None
    out = out_path or Path(f"{request.node_id}.request")
    _write_new(out, request.to_bytes())
    click.echo(
        f"wrote signing request {out} for node {request.node_id}; the enroll key's holder "
        f"runs: pxepeer enroll --sign {out.name} --key ENROLL_KEY"
    )


def _sign_request(request_path: Path, enroll_key: SigningKey, out_path: Path | None) -> None:
    try:
        request = EnrollRequest.from_bytes(_read_small(request_path, "request"))
    except IdentityError as exc:
        raise EnrollUsageError(f"{request_path}: {exc}") from None
    cert = NodeCertificate.issue(
        PublicKey(request.node_key), request.label, int(time.time()), enroll_key
    )
    out = out_path or request_path.with_name(f"{cert.node_id}.cert")
    _write_new(out, cert.to_bytes() + b"\n")
    click.echo(
        f"signed node {cert.node_id} ({cert.label or 'no label'}): {out}; install it on "
        f"the endpoint with: pxepeer enroll --certificate {out.name} --cache-dir C"
    )


def _install(cert_path: Path, cache_dir: Path) -> None:
    state = _state_dir(cache_dir)
    try:
        cert = NodeCertificate.from_bytes(_read_small(cert_path, "certificate"))
        install_certificate(state, cert)
    except (IdentityError, IdentityFileError) as exc:
        raise EnrollUsageError(f"{cert_path}: {exc}") from None
    click.echo(
        f"installed certificate for node {cert.node_id} ({cert.label or 'no label'}), "
        f"signed by enroll key {cert.issuer}"
    )
