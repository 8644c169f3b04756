"""Who a peer is: node ids derived from node keys, and the certificates that make a node
a member of a site. Pure: bytes and keys in, verified identities out.

A node's identity is an Ed25519 key pair kept in its store. Its *node id* is the key id
of the public key (the first 16 hex digits of its SHA-256): nobody can pick an id
without holding the matching private key, so a hello cannot borrow another peer's id,
and the election and the WAN-owner ranking (both ordered by node id) take nothing a
peer says about itself.

A *node certificate* is a small signed document, in the same canonical-JSON-plus-Ed25519
shape as manifests and catalogs (not X.509: the peer protocol signs requests itself, see
docs/security.md, so no TLS stack ever parses it):

    {"certificate": {"format": "pxepeer-node-cert 1", "node_key": B64, "node_id": ID,
                     "label": TEXT, "issued": UNIX, "issuer": ENROLL_KEY_ID},
     "signature": {"key_id": ENROLL_KEY_ID, "ed25519": B64}}

signed by an enroll-role key. A *signing request* carries the node's public key and a
label, signed by the node key itself (proof that whoever asks holds the key), so the
enroll key can stay on an admin's machine.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from dataclasses import dataclass

from imaging import strict_json
from imaging.doc_fields import FieldError, as_object, integer, require, text
from imaging.manifest import canonical_json
from imaging.signing import PublicKey, Signature, SignatureError, SigningKey, key_id_of

CERT_FORMAT = "pxepeer-node-cert 1"
REQUEST_FORMAT = "pxepeer-enroll-request 1"
MAX_CERT_BYTES = 4096
MAX_LABEL = 64
LABEL = re.compile(r"[\x20-\x7e]{0,64}")
_CERT_KEYS = frozenset({"format", "node_key", "node_id", "label", "issued", "issuer"})
_REQUEST_KEYS = frozenset({"format", "node_key", "node_id", "label", "created"})


class IdentityError(Exception):
    """A certificate or signing request we refuse; `reason` is a short fixed label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def node_id_of(public: PublicKey | bytes) -> str:
    raw = public.raw if isinstance(public, PublicKey) else public
    return key_id_of(raw)


def _b64_key(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 44:
        raise IdentityError("bad key", f"{what} is not 32 bytes of base64")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError("bad key", f"{what} is not base64") from None
    if len(raw) != 32:
        raise IdentityError("bad key", f"{what} is not 32 bytes")
    return raw


def check_label(label: str) -> str:
    if not LABEL.fullmatch(label):
        raise IdentityError("bad label", f"at most {MAX_LABEL} printable ASCII characters")
    return label


@dataclass(frozen=True)
class NodeCertificate:
    node_key: bytes  # raw Ed25519 public key
    label: str
    issued: int
    issuer: str  # key id of the enroll key that signed it
    signature: Signature
    body: bytes  # the canonical bytes the signature covers

    @property
    def node_id(self) -> str:
        return node_id_of(self.node_key)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.node_key, self.label, "node")

    @classmethod
    def issue(cls, node_key: PublicKey, label: str, issued: int, enroll_key: SigningKey
              ) -> NodeCertificate:  # fmt: skip
        doc = {
            "format": CERT_FORMAT,
            "node_key": base64.b64encode(node_key.raw).decode(),
            "node_id": node_id_of(node_key),
            "label": check_label(label),
            "issued": int(issued),
            "issuer": enroll_key.key_id,
        }
        body = canonical_json(doc)
        sig = Signature(enroll_key.key_id, enroll_key.sign(body))
        return cls(node_key.raw, label, int(issued), enroll_key.key_id, sig, body)

    def to_bytes(self) -> bytes:
        doc = {"certificate": strict_json.loads(self.body, MAX_CERT_BYTES),
               "signature": self.signature.to_json()}  # fmt: skip
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeCertificate:
        """Parse (not verify) a certificate; IdentityError and nothing else."""
        doc = _parse_key_document(data, "certificate", "signature", CERT_FORMAT, _CERT_KEYS,
                                  "issued")  # fmt: skip
        try:
            issuer = text(require(doc.inner, "issuer", "certificate"), "issuer", 16)
        except FieldError as exc:
            raise IdentityError(exc.reason, exc.detail) from None
        if doc.signature.key_id != issuer:
            raise IdentityError("bad signature", "signed by another key than its issuer")
        return cls(doc.node_key, doc.label, doc.time, issuer, doc.signature, doc.body)

    def verify(self, enroll_keys: dict[str, PublicKey]) -> str:
        """The node id, when an enroll key we trust signed this; IdentityError if not."""
        key = enroll_keys.get(self.issuer)
        if key is None:
            raise IdentityError(
                "untrusted issuer", f"signed by enroll key {self.issuer}, not trusted here"
            )
        try:
            key.verify(self.signature.value, self.body)
        except SignatureError:
            raise IdentityError("bad signature", "the enroll key's signature fails") from None
        return self.node_id


@dataclass(frozen=True)
class EnrollRequest:
    node_key: bytes
    label: str
    created: int
    proof: Signature  # by the node key over `body`
    body: bytes

    @property
    def node_id(self) -> str:
        return node_id_of(self.node_key)

    @classmethod
    def make(cls, node_key: SigningKey, label: str, created: int) -> EnrollRequest:
        doc = {
            "format": REQUEST_FORMAT,
            "node_key": base64.b64encode(node_key.public_key.raw).decode(),
            "node_id": node_key.key_id,
            "label": check_label(label),
            "created": int(created),
        }
        body = canonical_json(doc)
        proof = Signature(node_key.key_id, node_key.sign(body))
        return cls(node_key.public_key.raw, label, int(created), proof, body)

    def to_bytes(self) -> bytes:
        doc = {"request": strict_json.loads(self.body, MAX_CERT_BYTES),
               "proof": self.proof.to_json()}  # fmt: skip
        return canonical_json(doc) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> EnrollRequest:
        """Parse and check a request, including its proof of possession."""
        doc = _parse_key_document(data, "request", "proof", REQUEST_FORMAT, _REQUEST_KEYS,
                                  "created")  # fmt: skip
        try:
            PublicKey(doc.node_key).verify(doc.signature.value, doc.body)
        except SignatureError:
            raise IdentityError("bad proof", "not signed by the key it is for") from None
        return cls(doc.node_key, doc.label, doc.time, doc.signature, doc.body)


@dataclass(frozen=True)
class _KeyDocument:
    inner: dict[str, object]
    node_key: bytes
    label: str
    time: int
    signature: Signature
    body: bytes  # the canonical bytes of `inner`, which the signature covers


def _parse_key_document(data: bytes, name: str, signature_name: str, fmt: str,
                        keys: frozenset[str], time_field: str) -> _KeyDocument:  # fmt: skip
    """The part certificates and requests share: {NAME: {format, node_key, node_id,
    label, TIME, ...}, SIGNATURE_NAME: signature}, every field checked, the node id
    derived from the key. IdentityError and nothing else."""
    try:
        doc = strict_json.loads(data, MAX_CERT_BYTES)
        outer = as_object(doc, f"{name} document", frozenset({name, signature_name}))
        inner = as_object(require(outer, name, "document"), name, keys)
        if require(inner, "format", name) != fmt:
            raise IdentityError("bad format", f"not a {fmt}")
        node_key = _b64_key(require(inner, "node_key", name), "node_key")
        if require(inner, "node_id", name) != node_id_of(node_key):
            raise IdentityError("bad node id", "node_id is not derived from node_key")
        label = check_label(text(require(inner, "label", name), "label", MAX_LABEL, empty=True))
        when = integer(require(inner, time_field, name), time_field, 0, 1 << 40)
        signature = Signature.from_json(require(outer, signature_name, "document"))
    except strict_json.StrictJsonError as exc:
        raise IdentityError(exc.reason) from None
    except FieldError as exc:
        raise IdentityError(exc.reason, exc.detail) from None
    except SignatureError as exc:
        raise IdentityError(exc.reason, str(exc)) from None
    return _KeyDocument(inner, node_key, label, when, signature, canonical_json(inner))


class CertificateCache:
    """Certificates already verified, by their exact bytes: a peer sends its certificate
    with every request, and an Ed25519 check per request per peer is work we need not
    repeat. Bounded (LRU); only verified certificates are kept, so a flood of bad ones
    costs one failed check each and no memory."""

    def __init__(self, enroll_keys: dict[str, PublicKey], size: int = 1024):
        self.enroll_keys = enroll_keys
        self._size = size
        self._known: OrderedDict[bytes, NodeCertificate] = OrderedDict()

    def verify(self, data: bytes) -> NodeCertificate:
        cert = self._known.get(data)
        if cert is not None:
            self._known.move_to_end(data)
            return cert
        cert = NodeCertificate.from_bytes(data)
        cert.verify(self.enroll_keys)
        self._known[data] = cert
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        return cert
