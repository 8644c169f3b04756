"""What authenticating the peer protocol costs (issue 8), against work a peer does anyway.

    python -m bench.peer_auth [--reps 5] [--n 2000]

Each row times one operation per request, in-process, the median of `--reps` runs of
`--n` operations (and the spread, min-max). The reference is measured in the same run:
hashing one 4 MiB chunk, which every chunk request costs the receiving peer anyway. The
ratio says what the signature adds on top of it.

- sign+verify request: a signed GET (sign_request + verify_request with a warm
  certificate cache and a replay guard), i.e. one peer-to-peer request end to end;
- first contact: the same with the certificate checked against the enroll key (the
  cache is cold), once per peer and restart;
- sign+verify hello response: the responder's signature over the body and the asker's
  check of it, for a 20 KiB hello.

Measured 2026-11-30 on the shared 2-core development VM (`--reps 5 --n 1000`): chunk hash
2975 us (2799-3451); sign+verify request 345 us (247-378), 0.12x; first contact 624 us
(489-702), 0.21x; hello response 277 us (237-337), 0.09x. A peer-to-peer chunk request
costs about an eighth more CPU than the hash it needs anyway; a hello a second per peer
is a few hundred microseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.signing import PublicKey, SigningKey
from peer.core.identity import CertificateCache, NodeCertificate
from peer.core.peer_auth import (
    ReplayGuard,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

CHUNK = os.urandom(4 << 20)
HELLO = os.urandom(20 << 10)


def _key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def _setup() -> dict[str, object]:
    enroll, a, b = _key(), _key(), _key()
    keys = {enroll.key_id: PublicKey(enroll.public_key.raw, "", "enroll")}
    cert_a = NodeCertificate.issue(a.public_key, "a", 0, enroll).to_bytes()
    cert_b = NodeCertificate.issue(b.public_key, "b", 0, enroll).to_bytes()
    return {"keys": keys, "a": a, "b": b, "cert_a": cert_a, "cert_b": cert_b}


def _request(s: dict, cache: CertificateCache, guard: ReplayGuard) -> None:
    now = int(time.time() * 1000)
    path = "/v1/chunks/" + "ab" * 32
    headers = sign_request(s["a"], s["cert_a"], "GET", path, b"", s["b"].key_id, now,
                           secrets.token_hex(16))  # type: ignore[arg-type]  # fmt: skip
    verify_request(headers, "GET", path, b"", s["b"].key_id, cache, now, guard)  # type: ignore[attr-defined]


def _timed(op: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    s = _setup()
    warm = CertificateCache(s["keys"])  # type: ignore[arg-type]
    guard = ReplayGuard(0)

    def cold() -> None:
        _request(s, CertificateCache(s["keys"]), ReplayGuard(0))  # type: ignore[arg-type]

    def hello() -> None:
        nonce = secrets.token_hex(16)
        headers = sign_response(s["b"], s["cert_b"], nonce, 200, HELLO, 0)  # type: ignore[arg-type]
        verify_response(headers, nonce, 200, HELLO, warm)

    rows: dict[str, Callable[[], None]] = {
        "sha256 of a 4 MiB chunk (reference)": lambda: hashlib.sha256(CHUNK).digest(),
        "sign+verify request": lambda: _request(s, warm, guard),
        "first contact (certificate checked)": cold,
        "sign+verify 20 KiB hello response": hello,
    }
    results: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.reps):
        for name, op in rows.items():
            n = max(args.n // 50, 20) if "chunk" in name else args.n
            results[name].append(_timed(op, n))
    reference = statistics.median(results["sha256 of a 4 MiB chunk (reference)"])
    print(f"{'operation':<40}{'median':>12}{'spread':>22}{'vs chunk hash':>15}")
    for name, times in results.items():
        med = statistics.median(times)
        spread = f"{min(times) * 1e6:.0f}-{max(times) * 1e6:.0f} us"
        print(f"{name:<40}{med * 1e6:>9.0f} us{spread:>22}{med / reference:>14.3f}x")
    print(f"({args.reps} runs; median and min-max per operation)")


if __name__ == "__main__":
    main()
