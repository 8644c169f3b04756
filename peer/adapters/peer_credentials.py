"""This peer's credentials on the wire: signs its requests to other peers and its hello
responses, and checks theirs (the scheme is peer/core/peer_auth.py). One object per
daemon, shared by the site runtime (client side) and the HTTP API (server side); it
holds the only state the scheme needs: verified certificates, the nonces seen inside
the window, and each peer's clock offset.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

from imaging.signing import PublicKey
from peer.core.identity import CertificateCache, NodeCertificate
from peer.core.peer_auth import (
    ANY_TARGET,
    Authenticated,
    ClockOffsets,
    ReplayGuard,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)
from peer.core.rejections import Rejections
from peer.store.node_identity import NodeIdentity

AUTH_INPUT = "peer_auth"  # Rejections kind


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class PeerCredentials:
    def __init__(self, identity: NodeIdentity, enroll_keys: Mapping[str, PublicKey],
                 rejections: Rejections, clock=time.time):  # fmt: skip
        assert identity.cert is not None, "only an enrolled node speaks the peer protocol"
        self.identity = identity
        self.node_id = identity.node_id
        self.enroll_keys = dict(enroll_keys)
        self.certs = CertificateCache(self.enroll_keys)
        self.rejections = rejections
        self._clock = clock
        self.guard = ReplayGuard(started_ms=_ms(clock()))
        self.offsets = ClockOffsets()
        self._cert_bytes = identity.cert_bytes

    @property
    def cert(self) -> NodeCertificate:
        assert self.identity.cert is not None
        return self.identity.cert

    # -- client side ------------------------------------------------------------------

    def request_headers(self, method: str, path_qs: str, body: bytes = b"",
                        to: str | None = None) -> tuple[dict[str, str], str]:  # fmt: skip
        """Headers for a request to node `to` (None: a hello to whoever answers), and the
        nonce its signed response must echo."""
        nonce = secrets.token_hex(16)
        t = self.offsets.their_time(to, _ms(self._clock()))
        headers = sign_request(self.identity.key, self._cert_bytes, method, path_qs, body,
                               to or ANY_TARGET, t, nonce)  # fmt: skip
        return headers, nonce

    def check_response(self, headers: Mapping[str, str], nonce: str, status: int,
                       body: bytes, sent: float) -> NodeCertificate:  # fmt: skip
        """The certificate of the node that answered our request `nonce`; AuthError (and
        a count) when the answer is not signed by an enrolled node for this request."""
        try:
            cert, their_ms = verify_response(headers, nonce, status, body, self.certs)
        except Exception as exc:
            self.rejections.count(AUTH_INPUT, getattr(exc, "reason", "error"))
            raise
        self.offsets.learn(cert.node_id, their_ms, _ms(sent), _ms(self._clock()))
        return cert

    # -- server side ------------------------------------------------------------------

    def check_request(self, headers: Mapping[str, str], method: str, path_qs: str,
                      body: bytes, changes_state: bool) -> Authenticated:  # fmt: skip
        """The enrolled node that sent this request; AuthError (counted) otherwise. A
        request that changes state must also be fresh and never seen before."""
        try:
            return verify_request(
                headers, method, path_qs, body, self.node_id, self.certs,
                _ms(self._clock()), self.guard if changes_state else None,
            )  # fmt: skip
        except Exception as exc:
            self.rejections.count(AUTH_INPUT, getattr(exc, "reason", "error"))
            raise

    def response_headers(self, request: Authenticated, status: int, body: bytes
                         ) -> dict[str, str]:  # fmt: skip
        """Sign a response over the nonce of the (verified) request it answers."""
        return sign_response(self.identity.key, self._cert_bytes, request.fields.nonce,
                             status, body, _ms(self._clock()))  # fmt: skip
