"""Field checks shared by the signed documents (manifest, catalog) read from the network.

Each check takes a value straight out of `strict_json.loads` and either returns it typed
and within bounds or raises `FieldError` with a short fixed `reason` (a metric label;
the `detail` names the field, never echoes text from the wire at length). The document
parsers turn a FieldError into their own error type, so a caller catches one type.
"""

from __future__ import annotations

import re

from imaging.strict_json import StrictJsonError

HEX64 = re.compile(r"[0-9a-f]{64}")
# Names that go into URLs, file names and iPXE scripts: the CLI's own rule for names.
TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class FieldError(ValueError):
    """One field of a document is missing, of the wrong type or out of bounds."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def json_detail(exc: StrictJsonError) -> str:
    """The detail of a strict_json refusal, without its reason (which is passed on as
    the document error's own reason)."""
    return str(exc).partition(": ")[2]


def as_object(value: object, what: str, allowed: frozenset[str]) -> dict[str, object]:
    """A JSON object holding no keys but `allowed` (an unknown key is refused here rather
    than only by the canonical-form check, so the reason says which)."""
    if not isinstance(value, dict):
        raise FieldError("bad type", f"{what} is not an object")
    unknown = value.keys() - allowed
    if unknown:
        # The key came from the wire: escaped, so a log line stays one line.
        name = ascii(sorted(unknown)[0][:32])[1:-1]
        raise FieldError("unknown field", f"{what}.{name}")
    return value


def require(obj: dict[str, object], key: str, what: str) -> object:
    if key not in obj:
        raise FieldError("missing field", f"{what}.{key}")
    return obj[key]


def integer(value: object, what: str, low: int, high: int) -> int:
    # bool is an int in Python; `true` is not a size.
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError("bad type", f"{what} is not an integer")
    if not low <= value <= high:
        raise FieldError("out of range", f"{what} not in [{low}, {high}]")
    return value


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError("bad type", f"{what} is not true or false")
    return value


def text(value: object, what: str, max_len: int, *, empty: bool = False) -> str:
    """A printable string: no control characters, line or paragraph separators, format
    characters (bidi overrides) or unassigned code points. Names are shown in menus,
    logs and iPXE scripts, where a newline would be a second command."""
    if not isinstance(value, str):
        raise FieldError("bad type", f"{what} is not a string")
    if len(value) > max_len:
        raise FieldError("too long", f"{what} longer than {max_len}")
    if not value and not empty:
        raise FieldError("empty", what)
    if not value.isprintable():
        raise FieldError("bad text", f"{what} has control characters")
    return value


def token(value: object, what: str) -> str:
    """A name that ends up in URLs and file names: 1-64 letters, digits, '.', '_', '+'
    or '-', starting with a letter or digit."""
    if not isinstance(value, str):
        raise FieldError("bad type", f"{what} is not a string")
    if not TOKEN.fullmatch(value):
        raise FieldError("bad name", what)
    return value


def sha256_hex(value: object, what: str) -> str:
    """64 lower-case hex digits: the only spelling we write, so the only one accepted
    (an upper-case twin would name the same chunk under a second key)."""
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise FieldError("bad hash", what)
    return value


def array(value: object, what: str, max_items: int) -> list[object]:
    if not isinstance(value, list):
        raise FieldError("bad type", f"{what} is not a list")
    if len(value) > max_items:
        raise FieldError("too many", f"{what} has more than {max_items} items")
    return value


def serial_and_validity(
    fields: dict[str, object], what: str, min_serial: int, max_serial: int, max_time: int
) -> tuple[int, int, int]:
    """(serial, issued, expires) of a signed, serialled, expiring document (a catalog, a
    control document): each in range, and a document that expires before it was issued
    refused ("expires before issued")."""
    serial = integer(require(fields, "serial", what), "serial", min_serial, max_serial)
    issued = integer(require(fields, "issued", what), "issued", 0, max_time)
    expires = integer(require(fields, "expires", what), "expires", 0, max_time)
    if expires < issued:
        raise FieldError("expires before issued")
    return serial, issued, expires
