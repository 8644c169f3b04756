"""`pxepeer keys new --role` and `pxepeer enroll`, as a user runs them: the files they
write, the identity they keep, and a one-line error with exit code 2 for bad input."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imaging.signing import load_public_key

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=60, check=False)  # fmt: skip


def ok(*args: str, cwd: Path | None = None) -> str:
    result = run(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(*args: str, cwd: Path | None = None) -> str:
    result = run(*args, cwd=cwd)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pxepeer: error:")
    return result.stderr


def cert_of(cache: Path) -> dict:
    return json.loads((cache / "state" / "node.cert").read_text())["certificate"]


@pytest.fixture
def enroll_key(tmp_path: Path) -> Path:
    out = ok("keys", "new", "--out", str(tmp_path / "keys"), "--role", "enroll")
    assert "role        enroll" in out
    return tmp_path / "keys" / "enroll.key"


def test_a_public_key_file_says_what_its_key_may_sign(tmp_path: Path, enroll_key: Path) -> None:
    assert load_public_key(enroll_key.with_suffix(".pub")).role == "enroll"
    assert "role=enroll" in enroll_key.with_suffix(".pub").read_text()
    ok("keys", "new", "--out", str(tmp_path / "keys"))
    assert load_public_key(tmp_path / "keys" / "publisher.pub").role == "publisher"
    ok("keys", "new", "--out", str(tmp_path / "keys"), "--role", "operator")
    assert load_public_key(tmp_path / "keys" / "operator.pub").role == "operator"
    assert "--role" in refused("keys", "new", "--out", str(tmp_path / "k2"), "--role", "root")


def test_enrolling_gives_a_private_node_key_and_a_certificate_and_keeps_the_identity(
    tmp_path: Path, enroll_key: Path
) -> None:
    cache = tmp_path / "cache"
    first = ok("enroll", "--key", str(enroll_key), "--name", "till-3", "--cache-dir", str(cache))
    key_file = cache / "state" / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = cert_of(cache)
    assert cert["label"] == "till-3" and cert["node_id"] in first
    again = ok("enroll", "--key", str(enroll_key), "--cache-dir", str(cache))
    assert "identity kept" in again
    assert cert_of(cache)["node_id"] == cert["node_id"] and cert_of(cache)["label"] == "till-3"


def test_the_enroll_key_never_needs_to_be_on_the_endpoint(tmp_path: Path, enroll_key: Path) -> None:
    cache, admin = tmp_path / "cache", tmp_path / "admin"
    admin.mkdir()
    out = ok("enroll", "--request", "--name", "till-4", "--cache-dir", str(cache), cwd=tmp_path)
    [request] = list(tmp_path.glob("*.request"))
    node_id = request.stem
    assert node_id in out and not (cache / "state" / "node.cert").exists()
    (admin / request.name).write_bytes(request.read_bytes())
    ok("enroll", "--sign", str(admin / request.name), "--key", str(enroll_key))
    answer = admin / f"{node_id}.cert"
    ok("enroll", "--certificate", str(answer), "--cache-dir", str(cache))
    assert cert_of(cache)["node_id"] == node_id and cert_of(cache)["label"] == "till-4"
    # A certificate made for another endpoint is refused and nothing is installed.
    other = tmp_path / "other"
    assert "not this endpoint" in refused("enroll", "--certificate", str(answer),
                                          "--cache-dir", str(other))  # fmt: skip
    assert not (other / "state" / "node.cert").exists()


def test_bad_enroll_input_is_one_line_and_exit_2(tmp_path: Path, enroll_key: Path) -> None:
    ok("keys", "new", "--out", str(tmp_path / "pub"))
    cache = str(tmp_path / "cache")
    assert "publisher key" in refused("enroll", "--key", str(tmp_path / "pub" / "publisher.key"),
                                      "--cache-dir", cache)  # fmt: skip
    refused("enroll", "--cache-dir", cache)
    refused("enroll", "--request", "--key", str(enroll_key), "--cache-dir", cache)
    refused("enroll", "--sign", str(tmp_path / "nothing.request"), "--key", str(enroll_key))
    bogus = tmp_path / "bogus.request"
    bogus.write_text('{"request": {}, "proof": {}}')
    refused("enroll", "--sign", str(bogus), "--key", str(enroll_key))
    refused("enroll", "--key", str(enroll_key), "--name", "x" * 65, "--cache-dir", cache)
