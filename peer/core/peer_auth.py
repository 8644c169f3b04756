"""Signed peer requests and responses: how enrolled peers know who they talk to, and why a
captured request is worth nothing later. Pure: headers, bytes and the time in, an
authenticated node (or AuthError with a short reason) out.

Every request between peers carries two headers:

    X-Pxepeer-Cert: base64 of the sender's node certificate (peer/core/identity.py)
    X-Pxepeer-Auth: v1 to=TARGET t=MILLIS n=NONCE s=SIGNATURE

The signature (Ed25519, by the node key the certificate names) covers the method, the
path and query, the target's node id, the time, a random nonce and the SHA-256 of the
body. The receiver checks the certificate against the enroll keys it trusts, then the
signature, then (for requests that change anything) that the time is within WINDOW of
its own clock, not before it started, and that it has not seen the nonce: a request
replayed within the window is a repeated nonce, one replayed later is stale, one
captured before a restart is older than the restart, one sent to another peer names
another target.

Clocks need not agree: `t` is written in the *receiver's* clock. Every hello response is
signed the same way over the requester's fresh nonce and carries the responder's time,
so a peer learns each other peer's clock offset from an answer that cannot be replayed
(`ClockOffsets`). Only hello requests (which change nothing) are accepted whatever
their time, so a peer can learn the offset in the first place.

Responses that matter (hellos) are signed over the requester's nonce, the status and
the body's hash. Chunks, manifests and catalogs need no response signature: their
content is verified by hash or publisher signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from imaging.signing import SignatureError, SigningKey
from peer.core.identity import MAX_CERT_BYTES, CertificateCache, IdentityError, NodeCertificate

CERT_HEADER = "X-Pxepeer-Cert"
AUTH_HEADER = "X-Pxepeer-Auth"
ANY_TARGET = "*"  # hello requests: the poller may not know the id behind an endpoint yet
WINDOW_MS = 30_000  # how far a request's time may be from ours
MAX_NONCES_PER_NODE = 8192  # requests one node may make inside one window
MAX_NODES = 1024

_AUTH = re.compile(
    r"v1 (?:to=(?P<to>[0-9a-f]{16}|\*) )?t=(?P<t>\d{1,15}) n=(?P<n>[0-9a-f]{32}) "
    r"s=(?P<s>[A-Za-z0-9+/]{86}==)"
)


class AuthError(Exception):
    """A peer request or response we refuse; `reason` is a short fixed label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class AuthFields:
    to: str | None
    t: int
    nonce: str
    signature: bytes


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def request_bytes(method: str, path_qs: str, to: str, t: int, nonce: str, digest: str) -> bytes:
    return f"pxepeer-request-1\n{method.upper()}\n{path_qs}\n{to}\n{t}\n{nonce}\n{digest}".encode()


def response_bytes(nonce: str, t: int, status: int, digest: str) -> bytes:
    return f"pxepeer-response-1\n{nonce}\n{t}\n{status}\n{digest}".encode()


def parse_auth(value: str | None) -> AuthFields:
    if not value or len(value) > 256:
        raise AuthError("no signature" if not value else "bad auth header")
    match = _AUTH.fullmatch(value)
    if match is None:
        raise AuthError("bad auth header")
    try:
        signature = base64.b64decode(match["s"], validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("bad auth header") from None
    return AuthFields(match["to"], int(match["t"]), match["n"], signature)


def _cert(headers: Mapping[str, str], certs: CertificateCache) -> NodeCertificate:
    encoded = headers.get(CERT_HEADER)
    if not encoded:
        raise AuthError("no certificate")
    if len(encoded) > 4 * (MAX_CERT_BYTES // 3 + 1):
        raise AuthError("bad certificate", "too long")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("bad certificate", "not base64") from None
    try:
        return certs.verify(data)
    except IdentityError as exc:
        raise AuthError(exc.reason, str(exc)) from None


class ReplayGuard:
    """Nonces seen inside the window, per node, bounded. A node that makes more requests
    in one window than MAX_NONCES_PER_NODE is refused, not remembered partly: forgetting
    a nonce early would let its request be replayed."""

    def __init__(self, started_ms: int, window_ms: int = WINDOW_MS):
        self.started_ms, self.window_ms = started_ms, window_ms
        self._seen: dict[str, OrderedDict[str, int]] = {}  # node -> nonce -> expiry

    def admit(self, node_id: str, nonce: str, t: int, now_ms: int) -> None:
        if abs(t - now_ms) > self.window_ms:
            raise AuthError("stale", f"request time is {(t - now_ms) / 1000:+.1f} s from ours")
        if t < self.started_ms:
            raise AuthError("stale", "request made before this peer started")
        seen = self._seen.get(node_id)
        if seen is None:
            if len(self._seen) >= MAX_NODES:
                self._expire(now_ms)
                if len(self._seen) >= MAX_NODES:
                    raise AuthError("replay cache full")
            seen = self._seen[node_id] = OrderedDict()
        while seen and next(iter(seen.values())) < now_ms:
            seen.popitem(last=False)
        if nonce in seen:
            raise AuthError("replayed", "nonce already used")
        if len(seen) >= MAX_NONCES_PER_NODE:
            raise AuthError("replay cache full", f"node {node_id} sends too many requests")
        # Kept until the request could no longer pass the time check. Expiries are not
        # monotonic in insertion order (clients' times differ a little), so an entry may
        # outlive its expiry by a few; it is never dropped before it.
        seen[nonce] = max(t, now_ms) + self.window_ms

    def _expire(self, now_ms: int) -> None:
        for node, seen in list(self._seen.items()):
            if not seen or max(seen.values()) < now_ms:
                del self._seen[node]


def sign_request(key: SigningKey, cert: bytes, method: str, path_qs: str, body: bytes,
                 to: str, t: int, nonce: str) -> dict[str, str]:  # fmt: skip
    sig = key.sign(request_bytes(method, path_qs, to, t, nonce, body_hash(body)))
    return {
        CERT_HEADER: base64.b64encode(cert).decode(),
        AUTH_HEADER: f"v1 to={to} t={t} n={nonce} s={base64.b64encode(sig).decode()}",
    }


@dataclass(frozen=True)
class Authenticated:
    cert: NodeCertificate
    fields: AuthFields

    @property
    def node_id(self) -> str:
        return self.cert.node_id


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path_qs: str,
    body: bytes,
    me: str,
    certs: CertificateCache,
    now_ms: int,
    guard: ReplayGuard | None,
) -> Authenticated:
    """The authenticated sender of a request, or AuthError. `guard` None: a request that
    changes nothing (a hello), accepted whatever its time and nonce."""
    fields = parse_auth(headers.get(AUTH_HEADER))
    cert = _cert(headers, certs)
    to = fields.to or ""
    if to != me and not (guard is None and to == ANY_TARGET):
        raise AuthError("wrong target", f"request meant for {to or 'nobody'}")
    signed = request_bytes(method, path_qs, to, fields.t, fields.nonce, body_hash(body))
    try:
        cert.public_key.verify(fields.signature, signed)
    except SignatureError:
        raise AuthError("bad signature") from None
    if cert.node_id == me:
        raise AuthError("own identity", "a request signed with this peer's own key")
    if guard is not None:
        guard.admit(cert.node_id, fields.nonce, fields.t, now_ms)
    return Authenticated(cert, fields)


def sign_response(key: SigningKey, cert: bytes, nonce: str, status: int, body: bytes,
                  t: int) -> dict[str, str]:  # fmt: skip
    sig = key.sign(response_bytes(nonce, t, status, body_hash(body)))
    return {
        CERT_HEADER: base64.b64encode(cert).decode(),
        AUTH_HEADER: f"v1 t={t} n={nonce} s={base64.b64encode(sig).decode()}",
    }


def verify_response(headers: Mapping[str, str], nonce: str, status: int, body: bytes,
                    certs: CertificateCache) -> tuple[NodeCertificate, int]:  # fmt: skip
    """(the responder's certificate, its time in ms) for a response to our request with
    `nonce`; AuthError when it is not signed by an enrolled node for this very request."""
    fields = parse_auth(headers.get(AUTH_HEADER))
    if fields.nonce != nonce:
        raise AuthError("replayed", "response to another request")
    cert = _cert(headers, certs)
    try:
        cert.public_key.verify(
            fields.signature, response_bytes(nonce, fields.t, status, body_hash(body))
        )
    except SignatureError:
        raise AuthError("bad signature") from None
    return cert, fields.t


class ClockOffsets:
    """Each peer's clock minus ours, learned from its signed hello responses (which carry
    its time and answer our fresh nonce). Requests to it are timed in its clock."""

    def __init__(self) -> None:
        self._offset_ms: dict[str, int] = {}

    def learn(self, node_id: str, their_ms: int, sent_ms: int, received_ms: int) -> None:
        # The answer was made somewhere between sending and receiving: take the middle.
        self._offset_ms[node_id] = their_ms - (sent_ms + received_ms) // 2
        if len(self._offset_ms) > MAX_NODES:
            self._offset_ms.pop(next(iter(self._offset_ms)))

    def their_time(self, node_id: str | None, our_ms: int) -> int:
        return our_ms + self._offset_ms.get(node_id or "", 0)

    def forget(self, node_id: str) -> None:
        self._offset_ms.pop(node_id, None)
