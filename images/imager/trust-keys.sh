#!/usr/bin/env bash
# The trusted publisher keys in the form the imaging agent checks signatures with: one
# PEM SubjectPublicKeyInfo file per key, OUTDIR/KEYID.pem (KEYID: the first 16 hex digits
# of the SHA-256 of the raw key, as imaging/signing.py names keys and signatures do).
# Usage: trust-keys.sh OUTDIR publisher.pub [other.pub ...]
#
# A .pub file is pxepeer's one line `pxepeer-ed25519 <base64 of 32 raw bytes> <comment>`,
# possibly with more tokens; a `role=ROLE` token other than role=publisher (an operator
# or enrollment key) is skipped with a note: only publishers sign what goes on a disk.
# Fails, with one line on stderr, for a file that is not such a key or when no publisher
# key is left. images/imager/build.sh runs it for its --trust files; tests run it to
# point the agent (PXEPEER_TRUST_DIR) at the same files.
set -euo pipefail
export LC_ALL=C

die() { echo "trust-keys.sh: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: trust-keys.sh OUTDIR PUBLIC_KEY..."
out=$1
shift
mkdir -p "$out"
# DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410): SEQUENCE { SEQUENCE
# { OID 1.3.101.112 }, BIT STRING (33 bytes: 0 unused bits + the 32-byte key) }.
spki_prefix='\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00'
kept=0
for pub in "$@"; do
    [ -f "$pub" ] || die "$pub: no such key file"
    # The first line only; a key file is one line.
    read -r tag encoded rest <"$pub" || [ -n "${tag:-}" ] || die "$pub is empty"
    [ "${tag:-}" = pxepeer-ed25519 ] || die "$pub is not a pxepeer public key (want 'pxepeer-ed25519 ...')"
    [[ ${encoded:-} =~ ^[A-Za-z0-9+/]{43}=$ ]] || die "$pub: the key is not 32 bytes of base64"
    role=
    for token in ${rest:-}; do
        case $token in role=*) role=${token#role=} ;; esac
    done
    if [ -n "$role" ] && [ "$role" != publisher ]; then
        echo "trust-keys.sh: $pub has role $role, not publisher: not trusted for disks" >&2
        continue
    fi
    raw=$(printf '%s' "$encoded" | base64 -d | od -An -v -tx1 | tr -d ' \n')
    [ ${#raw} -eq 64 ] || die "$pub: an Ed25519 public key has 32 bytes"
    key_id=$(printf '%s' "$encoded" | base64 -d | sha256sum | cut -c1-16)
    {
        echo "-----BEGIN PUBLIC KEY-----"
        { printf '%b' "$spki_prefix"; printf '%s' "$encoded" | base64 -d; } | base64 -w 0
        echo
        echo "-----END PUBLIC KEY-----"
    } >"$out/$key_id.pem"
    kept=$((kept + 1))
done
[ "$kept" -gt 0 ] || die "no publisher key among $*: the imager could verify nothing"
