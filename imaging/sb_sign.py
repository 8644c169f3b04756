"""Signing EFI binaries with an organisation's own Secure Boot key (sbsigntool).

An organisation that enrolled its own certificate in its PCs' db signs what those PCs
boot: iPXE (`pxepeer secure-boot sign-ipxe`) and the imager as a unified kernel image
(`pxepeer image add --uki`). `sbsign` does the signing; this module checks the key and
certificate first (so a wrong pair is one line, not sbsign's OpenSSL dump) and handles a
passphrase-protected key without ever writing the decrypted key to disk: sbsign reads it
from a pipe (/dev/fd/N), fed the unencrypted PEM from memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

PASSPHRASE_ENV = "PXEPEER_SB_PASSPHRASE"


class SbSignError(Exception):
    """The key, the certificate or sbsign failed; the message is one line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _one_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:limit]


@dataclass(frozen=True)
class SbSigner:
    """A Secure Boot signing key and its certificate, checked to belong together."""

    key_pem: bytes  # unencrypted PKCS#8 PEM, held in memory only
    cert_path: Path
    subject: str

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, passphrase: bytes | None = None) -> SbSigner:
        try:
            key_data = key_path.read_bytes()
        except OSError as exc:
            raise SbSignError("unreadable key", f"--sb-key {key_path}: {exc.strerror}") from None
        try:
            cert_data = cert_path.read_bytes()
        except OSError as exc:
            raise SbSignError("unreadable cert", f"--sb-cert {cert_path}: {exc.strerror}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except ValueError:
            raise SbSignError(
                "bad cert", f"--sb-cert {cert_path} is not a PEM X.509 certificate"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_data, password=passphrase)
        except TypeError:
            # Encrypted without a passphrase given, or a passphrase for a plain key.
            if passphrase is None:
                raise SbSignError(
                    "passphrase needed",
                    f"--sb-key {key_path} is encrypted: give its passphrase with "
                    f"--sb-pass-file FILE or ${PASSPHRASE_ENV}",
                ) from None
            key = serialization.load_pem_private_key(key_data, password=None)
        except ValueError:
            why = "wrong passphrase or not" if passphrase is not None else "not"
            raise SbSignError("bad key", f"--sb-key {key_path}: {why} a PEM private key") from None
        public = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if (
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            != public
        ):
            raise SbSignError(
                "key does not match cert",
                f"--sb-key {key_path} is not the key of --sb-cert {cert_path}",
            )
        plain = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(plain, cert_path, cert.subject.rfc4514_string())

    def sign(self, source: Path, output: Path) -> None:
        """sbsign `source` into `output` (written next to it, then renamed into place)."""
        sbsign = shutil.which("sbsign")
        if sbsign is None:
            raise SbSignError("no sbsign", "sbsign is not installed (apt-get install sbsigntool)")
        tmp = output.with_name(f".{output.name}.tmp")
        read_fd, write_fd = os.pipe()
        # The key goes through a pipe from a thread: never on disk, and a key bigger
        # than the pipe's buffer cannot deadlock us.
        feeder = threading.Thread(target=_feed, args=(write_fd, self.key_pem), daemon=True)
        try:
            feeder.start()
            result = subprocess.run(
                [sbsign, "--key", f"/dev/fd/{read_fd}", "--cert", str(self.cert_path),
                 "--output", str(tmp), str(source)],
                pass_fds=(read_fd,), capture_output=True, text=True, check=False,
            )  # fmt: skip
        finally:
            os.close(read_fd)
            feeder.join(timeout=5)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise SbSignError(
                "sbsign failed", f"sbsign {source}: {_one_line(result.stderr + result.stdout)}"
            )
        os.replace(tmp, output)


def _feed(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # sbsign gave up before reading: its exit status says why


def verify(path: Path, cert: Path) -> tuple[bool, str]:
    """sbverify's verdict on `path` against `cert`: (valid, its last line)."""
    sbverify = shutil.which("sbverify")
    if sbverify is None:
        raise SbSignError("no sbverify", "sbverify is not installed (apt-get install sbsigntool)")
    result = subprocess.run(
        [sbverify, "--cert", str(cert), str(path)], capture_output=True, text=True, check=False
    )
    return result.returncode == 0, _one_line(result.stdout + result.stderr)


def read_passphrase(pass_file: Path | None) -> bytes | None:
    """The key's passphrase: the first line of --sb-pass-file, else $PXEPEER_SB_PASSPHRASE,
    else None (a key without one)."""
    if pass_file is not None:
        try:
            text = pass_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SbSignError(
                "unreadable passphrase", f"--sb-pass-file {pass_file}: {exc}"
            ) from None
        return text.splitlines()[0].encode() if text else b""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value is not None else None
