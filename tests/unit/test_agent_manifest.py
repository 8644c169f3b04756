"""The imaging agent's reader of signed manifests (busybox awk over canonical JSON), held
against imaging/manifest.py: what it reads is what Python reads, and anything that is
not a canonical pxepeer manifest is refused, not half-read.

Run through `pxepeer-agent.sh --check-manifest FILE`, which prints the names, the disk
file and one line per disk chunk (INDEX OFFSET SIZE SHA256 zero|data).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest

AGENT = Path(__file__).resolve().parents[2] / "imaging" / "agent" / "pxepeer-agent.sh"
BUSYBOX = Path("/bin/busybox")
CS = 4096

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox is not installed")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_file(sizes_and_zero: list[tuple[int, bool]], role: str = "disk") -> FileEntry:
    refs = tuple(
        ChunkRef(sha(bytes(size)) if zero else sha(b"%d" % i), size, zero)
        for i, (size, zero) in enumerate(sizes_and_zero)
    )
    return FileEntry(role, sum(s for s, _ in sizes_and_zero), sha(role.encode()), refs)


def manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "demo-os",
        "version": "1",
        "boot": BootSpec(ImageKind.DISK),
        "files": (disk_file([(CS, False), (CS, True), (CS, False), (100, False)]),),
        "chunk_size": CS,
        "created": "2026-01-01T00:00:00Z",
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def check(tmp_path: Path, data: bytes) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "manifest.json"
    path.write_bytes(data)
    return subprocess.run(
        [str(BUSYBOX), "sh", str(AGENT), "--check-manifest", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )  # fmt: skip


def expected_output(m: Manifest) -> list[str]:
    disk = m.file("disk")
    assert disk is not None
    data = [r for r in disk.chunks if not r.zero]
    return [
        f"name={m.name}",
        f"version={m.version}",
        f"disk={disk.size} {disk.sha256} chunk_size={m.chunk_size} chunks={len(disk.chunks)} "
        f"data={len(data)} bytes={sum(r.size for r in data)}",
        *(
            f"{i} {offset} {ref.size} {ref.sha256} {'zero' if ref.zero else 'data'}"
            for i, (offset, ref) in enumerate(disk.offsets())
        ),
    ]


@pytest.mark.parametrize(
    "m",
    [
        manifest(),
        # Names as canonical JSON escapes them (quote, backslash), and raw UTF-8.
        manifest(name='say "hi" \\ to é ☃', version="2.0 beta"),
        # The disk after other files, with an initrd and kernel of their own chunks.
        manifest(
            boot=BootSpec(ImageKind.LINUX, kernel="kernel", initrd="initrd", cmdline='a="b c"'),
            files=(
                disk_file([(CS, False)], "kernel"),
                disk_file([(CS, False), (7, False)], "initrd"),
                disk_file([(CS, True), (CS, True), (CS, False)]),
            ),
        ),
        # Free-form extra: nested, numbers of every JSON kind, escapes, keys that look
        # like ours. Read past, never read.
        manifest(
            extra={
                "files": [{"role": "disk", "size": 1}],
                "n": [-1, 0, 1.5, 2e10, True, False, None],
                'q"\\\n\u0001': {"": "tab\there"},
            }
        ),
        manifest(files=(disk_file([]),)),  # an empty disk: no chunks at all
        manifest(chunk_size=8192, files=(disk_file([(8192, False), (8192, True), (1, True)]),)),
    ],
    ids=["plain", "escaped-names", "several-files", "extra", "empty-disk", "zero-last"],
)
def test_the_agent_reads_what_python_reads(tmp_path: Path, m: Manifest) -> None:
    result = check(tmp_path, m.canonical_bytes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected_output(m)


def test_a_large_disk_manifest_is_read_in_full(tmp_path: Path) -> None:
    # 2,000 chunks of 4 MiB, every third zero: offsets past 4 GiB stay exact.
    refs = [(4 << 20, i % 3 == 0) for i in range(2000)]
    m = manifest(chunk_size=4 << 20, files=(disk_file(refs),))
    result = check(tmp_path, m.canonical_bytes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected_output(m)


def _canonical() -> str:
    return manifest().canonical_bytes.decode()


CHUNK0 = f'{{"sha256":"{sha(b"0")}","size":{CS}}}'
REFUSED = {
    # Not what the publisher signs: spaces, another order, a field twice, unknown fields.
    "space": lambda t: t.replace('"chunk_size":', '"chunk_size": '),
    "pretty": lambda t: t.replace(",", ", "),
    "trailing-newline": lambda t: t + "\n",
    "trailing-garbage": lambda t: t + "x",
    "two-documents": lambda t: t + t,
    "cut-short": lambda t: t[:-1],
    "cut-in-a-string": lambda t: t[: t.index('"role"') + 3],
    "keys-out-of-order": lambda t: t.replace(
        '"name":"demo-os","version":"1"', '"version":"1","name":"demo-os"'
    ),
    "key-twice": lambda t: t.replace('"name":"demo-os"', '"name":"demo-os","name":"demo-os"'),
    "unknown-top-field": lambda t: t.replace('"name":', '"nonsense":1,"name":'),
    "unknown-chunk-field": lambda t: t.replace(CHUNK0, CHUNK0[:-1] + ',"where":1}'),
    "unknown-file-field": lambda t: t.replace('"role":"disk"', '"role":"disk","mode":1'),
    "other-format": lambda t: t.replace("pxepeer-manifest/1", "pxepeer-manifest/2"),
    "no-format": lambda t: t.replace('"format":"pxepeer-manifest/1",', ""),
    "no-name": lambda t: t.replace('"name":"demo-os",', ""),
    "empty-name": lambda t: t.replace('"name":"demo-os"', '"name":""'),
    "no-disk": lambda t: t.replace('"role":"disk"', '"role":"kernel"'),
    "two-disks": lambda t: t.replace('"files":[{', '"files":[' + _disk_json() + ",{"),
    # Chunk lists that are not the file cut at chunk_size.
    "chunk-dropped": lambda t: t.replace(CHUNK0 + ",", ""),
    "chunk-too-big": lambda t: t.replace(f'"size":{CS}}}', f'"size":{CS + 1}}}', 1),
    "short-chunk-not-last": lambda t: t.replace(f'"size":{CS}}}', f'"size":{CS - 1}}}', 1),
    "file-size-off": lambda t: t.replace(f'"size":{3 * CS + 100}}}', f'"size":{3 * CS + 99}}}'),
    "zero-false": lambda t: t.replace('"zero":true', '"zero":false'),
    "zero-not-bool": lambda t: t.replace('"zero":true', '"zero":1'),
    "negative-size": lambda t: t.replace(f'"size":{CS}}}', f'"size":-{CS}}}', 1),
    "float-size": lambda t: t.replace(f'"size":{CS}}}', f'"size":{CS}.0}}', 1),
    "leading-zero": lambda t: t.replace(f'"size":{CS}}}', f'"size":0{CS}}}', 1),
    "string-size": lambda t: t.replace(f'"size":{CS}}}', f'"size":"{CS}"}}', 1),
    "short-hash": lambda t: t.replace(sha(b"0"), sha(b"0")[:-1]),
    "upper-hash": lambda t: t.replace(sha(b"0"), sha(b"0").upper()),
    "tiny-chunk-size": lambda t: t.replace(f'"chunk_size":{CS}', '"chunk_size":16'),
    # Not JSON at all, or JSON the agent does not read in a name.
    "top-level-list": lambda t: "[" + t + "]",
    "control-byte": lambda t: t.replace("demo-os", "demo\x01os"),
    "bad-escape": lambda t: t.replace("demo-os", "demo\\qos"),
    "unicode-escape-in-name": lambda t: t.replace("demo-os", "demo\\u002dos"),
    "unbalanced": lambda t: t.replace('"files":[', '"files":[['),
    "empty": lambda t: "",
}


def _disk_json() -> str:
    t = _canonical()
    start = t.index('{"chunks"')
    return t[start : t.index('"size":', t.index('"role":"disk"')) + len(f'"size":{3 * CS + 100}}}')]


@pytest.mark.parametrize("mutate", REFUSED.values(), ids=REFUSED.keys())
def test_anything_but_a_canonical_manifest_is_refused(tmp_path: Path, mutate) -> None:
    text = mutate(_canonical())
    assert text != _canonical()
    result = check(tmp_path, text.encode())
    assert result.returncode != 0, result.stdout
    assert "not one the agent reads" in result.stderr or "control characters" in result.stderr
    assert result.stdout == ""
