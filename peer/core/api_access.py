"""Who may call which HTTP route: the decision, without I/O (peer/api/auth.py applies it).

Routes fall in three groups (docs/security.md lists every one):

  BOOT   what firmware, boot loaders and the imager fetch or report, and what any client
         may read because the content is publisher-signed: no token, ever (firmware
         cannot send one; the imager's reports carry their job's secret instead);
  PEER   the peer protocol: authenticated by signed requests (peer/core/peer_auth.py),
         never by tokens;
  roles  the API proper: reads need `viewer`, changes need `technician` (assignments)
         or `operator` (everything: site-local pause and priority).

Roles are ordered, viewer < technician < operator: a higher role may do everything a
lower one may. Reads are open to loopback clients when the daemon is told so (the
default: whoever is on the peer's own machine can read its files anyway), and open to
everyone while the store has never issued a token (a store without tokens works as
before they existed; issuing the first one is what closes the API). Changes always need
a token, from loopback too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.IntEnum):
    VIEWER = 1
    TECHNICIAN = 2
    OPERATOR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"role {text!r}: want viewer, technician or operator") from None


ROLE_NAMES = tuple(r.label for r in Role)


class Group(enum.Enum):
    BOOT = "boot"
    PEER = "peer"
    READ = "read"  # needs viewer (loopback and token-less stores exempt)
    CHANGE = "change"  # needs the route's role, always


@dataclass(frozen=True)
class Need:
    group: Group
    role: Role | None = None  # for READ (viewer) and CHANGE

    @property
    def label(self) -> str:
        return self.group.value if self.role is None else f"{self.group.value}:{self.role.label}"


BOOT = Need(Group.BOOT)
PEER = Need(Group.PEER)
VIEWER = Need(Group.READ, Role.VIEWER)
TECHNICIAN = Need(Group.CHANGE, Role.TECHNICIAN)
OPERATOR = Need(Group.CHANGE, Role.OPERATOR)


class Credential(enum.Enum):
    """What the request presented, as the token store judged it."""

    NONE = "none"  # no Authorization header
    INVALID = "invalid"  # a header that is no token this store issued (or malformed)
    VALID = "valid"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200  # 401 or 403 when refused
    reason: str = ""  # Rejections label: missing, invalid, forbidden


ALLOW = Decision(True)
MISSING = Decision(False, 401, "missing")
INVALID = Decision(False, 401, "invalid")
FORBIDDEN = Decision(False, 403, "forbidden")


def decide(
    need: Need,
    credential: Credential,
    role: Role | None,
    *,
    loopback: bool,
    open_loopback: bool,
    enforced: bool,
) -> Decision:
    """May a request go on? `role` is the valid token's role; `enforced` is False while
    the store has never issued a token.

    Presented credentials are always checked on token routes, exempt or not: a client
    with a wrong or revoked token learns it at once instead of working by accident on
    loopback and failing elsewhere."""
    if need.group in (Group.BOOT, Group.PEER):
        return ALLOW
    if credential is Credential.INVALID:
        return INVALID
    if credential is Credential.VALID:
        assert role is not None and need.role is not None
        return ALLOW if role >= need.role else FORBIDDEN
    if need.group is Group.READ and (not enforced or (loopback and open_loopback)):
        return ALLOW
    return MISSING
