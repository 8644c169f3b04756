"""API bearer tokens in the store: state/api_tokens.json.

A token is `pxp_` and 32 random bytes in base64url. Only the SHA-256 of those bytes is
kept, with the token's role, name and creation time: the file lets nobody call the API,
and a token is shown once, when it is made. A token's id is the first 12 hex digits of
that hash (not secret: `token list` shows it, `token revoke` takes it).

The file is written whole (temp, fsync, rename, directory fsync) under an exclusive lock,
so two `pxepeer token new` never lose each other's token and a crash leaves the old file
or the new one. The daemon reads it again whenever it changes on disk: a token made or
revoked while it runs counts from the next request.

Once the file exists the API is closed to anyone without a token (peer/core/api_access.py);
revoking every token keeps it closed. Removing the file opens it again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging.durable import write_atomic
from imaging.strict_json import StrictJsonError, loads
from peer.core.api_access import Role

log = logging.getLogger("pxepeer.tokens")

TOKENS_FILE = "api_tokens.json"
LOCK_FILE = "api_tokens.lock"
PREFIX = "pxp_"
SECRET_BYTES = 32
TOKEN_CHARS = len(PREFIX) + 43  # base64url of 32 bytes, unpadded
MAX_FILE_BYTES = 1 << 20
MAX_TOKENS = 1000
ID_CHARS = 12
MAX_NAME = 64


class TokenError(Exception):
    """A token file or request that cannot be used; the message says why."""


def _hash(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def parse_token(text: str) -> bytes | None:
    """The secret bytes of a well-formed token, None for anything else (bounded first)."""
    if len(text) != TOKEN_CHARS or not text.startswith(PREFIX):
        return None
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError):
        return None
    # Only the canonical spelling: one token, one string.
    if len(raw) != SECRET_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
        return None
    return raw


@dataclass(frozen=True)
class TokenEntry:
    sha256: str
    role: Role
    name: str
    created: int

    @property
    def token_id(self) -> str:
        return self.sha256[:ID_CHARS]

    def to_json(self) -> dict[str, object]:
        return {"sha256": self.sha256, "role": self.role.label, "name": self.name,
                "created": self.created}  # fmt: skip

    @classmethod
    def from_json(cls, item: object) -> TokenEntry:
        if not isinstance(item, dict):
            raise TokenError("a token entry is not an object")
        sha, role, name, created = (item.get(k) for k in ("sha256", "role", "name", "created"))
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise TokenError("a token entry has no SHA-256")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise TokenError("a token entry has no name")
        if not isinstance(created, int) or isinstance(created, bool):
            raise TokenError("a token entry has no creation time")
        try:
            parsed = Role.parse(role) if isinstance(role, str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise TokenError(f"token {name!r} has an unknown role")
        return cls(sha, parsed, name, created)


def parse_file(data: bytes) -> list[TokenEntry]:
    try:
        doc = loads(data, MAX_FILE_BYTES)
    except StrictJsonError as exc:
        raise TokenError(f"not a token file ({exc})") from None
    items = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) > MAX_TOKENS:
        raise TokenError("not a token file (no token list)")
    return [TokenEntry.from_json(item) for item in items]


def render_file(entries: list[TokenEntry]) -> bytes:
    return json.dumps({"tokens": [e.to_json() for e in entries]}, indent=1).encode() + b"\n"


class TokenStore:
    def __init__(self, state_dir: Path, clock=time.time):
        self.path = state_dir / TOKENS_FILE
        self.lock_path = state_dir / LOCK_FILE
        self._clock = clock
        self._entries: list[TokenEntry] = []
        self._exists = False
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size)

    # -- reading -------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> list[TokenEntry]:
        """The file's tokens (none when there is no file); TokenError when unreadable."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TokenError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return parse_file(data)
        except TokenError as exc:
            raise TokenError(f"{self.path}: {exc}") from None

    def refresh(self) -> None:
        """Read the file again if it changed on disk (one stat when it did not). A file
        that cannot be read keeps the API closed: no token is accepted until it is fixed."""
        stat = self._stat()
        if stat == self._seen:
            return
        self._seen = stat
        self._exists = stat is not None
        try:
            self._entries = self._read()
        except TokenError as exc:
            log.error("no API token is accepted: %s", exc)
            self._entries = []

    @property
    def enforced(self) -> bool:
        """True once the store has issued a token (the file exists, even emptied)."""
        self.refresh()
        return self._exists

    def lookup(self, presented: str) -> TokenEntry | None:
        """The entry of a token this store issued, None for any other string. Every
        stored hash is compared, in constant time, whichever matches."""
        self.refresh()
        secret = parse_token(presented)
        offered = _hash(secret) if secret is not None else "0" * 64
        found = None
        for entry in self._entries:
            if hmac.compare_digest(offered, entry.sha256) and secret is not None:
                found = entry
        return found

    def entries(self) -> list[TokenEntry]:
        """The tokens on disk now, for `token list`; TokenError when unreadable."""
        return self._read()

    # -- changing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[TokenEntry]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)

    def _write(self, entries: list[TokenEntry]) -> None:
        try:
            write_atomic(self.path, render_file(entries), 0o600)
        except OSError as exc:
            raise TokenError(f"cannot write {self.path}: {exc.strerror}") from None
        self._seen = None  # read it again on the next use

    def create(self, role: Role, name: str | None = None) -> tuple[str, TokenEntry]:
        """A new token (the string to hand out, shown once) and its stored entry; the
        name defaults to ROLE-ID."""
        with self._locked() as entries:
            if name is not None and any(e.name == name for e in entries):
                raise TokenError(f"a token named {name!r} exists (token revoke {name} first)")
            if len(entries) >= MAX_TOKENS:
                raise TokenError(f"{MAX_TOKENS} tokens already: revoke some first")
            secret = secrets.token_bytes(SECRET_BYTES)
            token = PREFIX + base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
            sha = _hash(secret)
            entry = TokenEntry(sha, role, name or f"{role.label}-{sha[:ID_CHARS]}",
                               int(self._clock()))  # fmt: skip
            self._write([*entries, entry])
        return token, entry

    def add(self, role: Role, name: str, token: str) -> TokenEntry:
        """Accept a token made elsewhere (another store's `token new`), so one credential,
        e.g. a fleet Prometheus's, opens every store it is added to. Only its hash is kept."""
        secret = parse_token(token)
        if secret is None:
            raise TokenError(f"not a pxepeer token (expected {PREFIX} and 43 base64url characters)")
        sha = _hash(secret)
        with self._locked() as entries:
            for e in entries:
                if e.sha256 == sha:
                    raise TokenError(f"this token is already here as {e.name!r} ({e.role.label})")
                if e.name == name:
                    raise TokenError(f"a token named {name!r} exists (token revoke {name} first)")
            if len(entries) >= MAX_TOKENS:
                raise TokenError(f"{MAX_TOKENS} tokens already: revoke some first")
            entry = TokenEntry(sha, role, name, int(self._clock()))
            self._write([*entries, entry])
        return entry

    def revoke(self, which: str) -> TokenEntry:
        """Remove the token with this name or id; TokenError when none or several match."""
        with self._locked() as entries:
            matches = [e for e in entries if which in (e.name, e.token_id)]
            if not matches:
                raise TokenError(f"no token named {which!r} or with that id")
            if len(matches) > 1:
                raise TokenError(f"{which!r} names several tokens: revoke by id")
            self._write([e for e in entries if e is not matches[0]])
        return matches[0]
