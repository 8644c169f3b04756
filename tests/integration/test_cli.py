"""The `pxepeer` keys / image / assign commands as real processes on real files.

Every failing command must print exactly one line on stderr, exit 2, and leave the cache
directory exactly as it was (compared file by file, by hash).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaging.catalog import Catalog, CatalogEntry, SignedCatalog
from imaging.manifest import SignedManifest
from imaging.origin_layout import CATALOG, chunk_path, manifest_path
from imaging.signing import TrustedKeys, load_public_key, load_signing_key

MIB = 1024 * 1024
CHUNK = 4 * MIB
PXEPEER = [sys.executable, "-m", "peer.cli"]
MAC = "52:54:00:ab:cd:ef"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pxepeer(
    *args: str | Path, timeout: float = 20, argv0: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PXEPEER_CACHE_DIR"}
    return subprocess.run(
        [*(argv0 or PXEPEER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = pxepeer(*args)
    assert result.returncode == 0, f"pxepeer {args} failed: {result.stderr}"
    return result


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str]) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pxepeer: error: "), lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (path relative to root) with the SHA-256 of its bytes."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def chunk_files(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in (cache / "chunks").glob("*/*") if p.is_file()}


def manifests(cache: Path) -> list[SignedManifest]:
    return [SignedManifest.from_bytes(p.read_bytes()) for p in (cache / "manifests").glob("*")]


@dataclass(frozen=True)
class Keys:
    dir: Path

    @property
    def key(self) -> Path:
        return self.dir / "publisher.key"

    @property
    def pub(self) -> Path:
        return self.dir / "publisher.pub"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("keys")
    ok("keys", "new", "--out", out)
    return Keys(out)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("other-keys")
    ok("keys", "new", "--out", out)
    return Keys(out)


@dataclass(frozen=True)
class Image:
    cache: Path
    kernel: Path
    initrd: Path
    kernel_bytes: bytes
    initrd_bytes: bytes


def add_demo(tmp: Path, keys: Keys, name: str = "demo", version: str = "1") -> Image:
    kernel_bytes = os.urandom(CHUNK + MIB + 123)  # a full chunk and a partial one
    initrd_bytes = os.urandom(300_000)
    kernel, initrd = tmp / "vmlinuz", tmp / "initrd.img"
    kernel.write_bytes(kernel_bytes)
    initrd.write_bytes(initrd_bytes)
    cache = tmp / "cache"
    ok(
        "image", "add", name, "--kernel", kernel, "--initrd", initrd,
        "--cmdline", "console=ttyS0 quiet", "--key", keys.key, "--version", version,
        "--cache-dir", cache,
    )  # fmt: skip
    return Image(cache, kernel, initrd, kernel_bytes, initrd_bytes)


@pytest.fixture
def demo(tmp_path: Path, keys: Keys) -> Image:
    return add_demo(tmp_path, keys)


# -- keys new ---------------------------------------------------------------------------


def test_keys_new_writes_private_key_0600_and_public_key(tmp_path: Path) -> None:
    result = ok("keys", "new", "--out", tmp_path / "k", "--name", "shop")
    private, public = tmp_path / "k" / "shop.key", tmp_path / "k" / "shop.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key_id = load_public_key(public).key_id
    assert public.read_text().startswith("pxepeer-ed25519 ")
    assert key_id in result.stdout
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["shop.key", "shop.pub"]


def test_keys_new_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    ok("keys", "new", "--out", tmp_path)
    before = snapshot(tmp_path)
    result = pxepeer("keys", "new", "--out", tmp_path)
    assert_one_line_usage_error(result)
    assert "already exists" in result.stderr
    assert snapshot(tmp_path) == before


def test_keys_new_refuses_a_file_as_out_dir_and_a_bad_name(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_one_line_usage_error(pxepeer("keys", "new", "--out", tmp_path / "file"))
    assert_one_line_usage_error(pxepeer("keys", "new", "--out", tmp_path, "--name", "../up"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_keys_new_modes_do_not_depend_on_the_umask_and_no_temp_file_is_left(
    tmp_path: Path,
) -> None:
    """Under umask 000 a plain write would leave the public key world-writable; the key
    files get their modes before their first byte (imaging/durable.write_atomic)."""
    result = subprocess.run(
        [*PXEPEER, "keys", "new", "--out", str(tmp_path / "a" / "b")],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "a" / "b"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"publisher.key": 0o600, "publisher.pub": 0o644}


# -- image add --------------------------------------------------------------------------


def test_add_stores_4_mib_chunks_named_by_their_hash_under_a_fan_out_dir(demo: Image) -> None:
    files = chunk_files(demo.cache)
    for name, path in files.items():
        assert path.parent.name == name[:2] and path.parent.parent == demo.cache / "chunks"
        assert sha(path.read_bytes()) == name
    expected = {
        sha(demo.kernel_bytes[:CHUNK]),
        sha(demo.kernel_bytes[CHUNK:]),  # the final partial chunk, 1 MiB + 123
        sha(demo.initrd_bytes),
    }
    assert set(files) == expected
    assert sorted(p.stat().st_size for p in files.values()) == [300_000, MIB + 123, CHUNK]
    assert list((demo.cache / "tmp").iterdir()) == []


def test_add_writes_a_signed_manifest_named_by_its_id(demo: Image, keys: Keys) -> None:
    [path] = (demo.cache / "manifests").iterdir()
    signed = SignedManifest.from_bytes(path.read_bytes())
    m = signed.manifest
    assert path.name == f"{m.manifest_id}.json"
    publisher = load_public_key(keys.pub)
    assert signed.verify(TrustedKeys([publisher])) == publisher.key_id
    assert (m.name, m.version, m.boot.kind.value) == ("demo", "1", "linux")
    assert (m.boot.kernel, m.boot.initrd, m.boot.cmdline) == (
        "kernel", "initrd", "console=ttyS0 quiet",
    )  # fmt: skip
    kernel = m.file("kernel")
    assert kernel is not None and kernel.size == len(demo.kernel_bytes)
    assert kernel.sha256 == sha(demo.kernel_bytes)
    assert [c.size for c in kernel.chunks] == [CHUNK, MIB + 123]
    rebuilt = b"".join(
        (demo.cache / "chunks" / c.sha256[:2] / c.sha256).read_bytes() for c in kernel.chunks
    )
    assert rebuilt == demo.kernel_bytes


def test_add_with_arch_arm64_signs_it_into_the_boot_section(tmp_path: Path, keys: Keys) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(os.urandom(5000))
    cache = tmp_path / "cache"
    ok("image", "add", "imager-arm64", "--kind", "imager", "--arch", "arm64",
       "--kernel", kernel, "--key", keys.key, "--cache-dir", cache)  # fmt: skip
    ok("image", "add", "imager", "--kind", "imager", "--kernel", kernel, "--key", keys.key,
       "--cache-dir", cache)  # fmt: skip
    arch = {m.manifest.name: m.manifest.boot.arch for m in manifests(cache)}
    assert arch == {"imager-arm64": "arm64", "imager": "amd64"}
    raw = {p.read_bytes().count(b'"arch"') for p in (cache / "manifests").iterdir()}
    assert raw == {0, 1}  # amd64, the default, is not written: old manifests keep their ids
    kinds = {row[0]: row[2] for row in list_rows(cache)[1:]}
    assert kinds == {"imager-arm64": "imager/arm64", "imager": "imager"}


def test_add_prints_no_progress_for_small_files(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "k").write_bytes(os.urandom(MIB))
    result = ok("image", "add", "small", "--kernel", tmp_path / "k", "--key", keys.key,
                "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert result.stderr == ""
    assert "added small 1" in result.stdout


def test_add_shows_a_progress_bar_on_stderr_for_a_large_file(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "big").write_bytes(os.urandom(20 * MIB))
    result = ok("image", "add", "big", "--kernel", tmp_path / "big", "--key", keys.key,
                "--cache-dir", tmp_path / "cache")  # fmt: skip
    lines = result.stderr.splitlines()
    assert len(lines) >= 3, result.stderr
    assert all(line.startswith("kernel") and "%" in line and "MiB" in line for line in lines)
    assert "100.0%" in lines[-1] and "20.0/20.0 MiB" in lines[-1]


def test_progress_rate_counts_from_the_start_of_the_file(tmp_path: Path, keys: Keys) -> None:
    """The bar is made on the first progress callback, after the first 4 MiB were already
    read, hashed and stored (image_add's progress callback), so its first rate is absurd."""
    (tmp_path / "big").write_bytes(os.urandom(20 * MIB))
    result = ok("image", "add", "big", "--kernel", tmp_path / "big", "--key", keys.key,
                "--cache-dir", tmp_path / "cache")  # fmt: skip
    rates = [float(line.split()[-2]) for line in result.stderr.splitlines()]
    assert rates and max(rates) < 50_000, result.stderr  # MiB/s: beyond any real disk


def make_sparse_disk(path: Path) -> tuple[bytes, int]:
    """1 GiB + 4097 bytes made with `truncate -s`, nearly all holes: written zeros in
    chunk 0, data in chunk 100 (which starts with a hole), and a final partial chunk
    that is a hole."""
    size = 1024 * MIB + 4097
    data = os.urandom(MIB)
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    with open(path, "r+b") as f:
        f.write(bytes(CHUNK))
        f.seek(100 * CHUNK + 3 * MIB)
        f.write(data)
    return data, size


# `pxepeer` counting the bytes pread from one file (argv[1]) into a file (argv[2]).
READ_COUNTING_PXEPEER = [sys.executable, "-c", """
import atexit, os, sys
victim, report = os.path.realpath(sys.argv[1]), sys.argv[2]
real_pread, total = os.pread, [0]
def pread(fd, n, offset):
    out = real_pread(fd, n, offset)
    if os.readlink(f"/proc/self/fd/{fd}") == victim:
        total[0] += len(out)
    return out
os.pread = pread
atexit.register(lambda: open(report, "w").write(str(total[0])))
from peer.cli import main
sys.argv = ["pxepeer", *sys.argv[3:]]
main(prog_name="pxepeer")
"""]  # fmt: skip


def test_add_sparse_disk_marks_zero_chunks_and_stores_only_data(tmp_path: Path, keys: Keys) -> None:
    disk = tmp_path / "disk.img"
    data, size = make_sparse_disk(disk)
    cache, report = tmp_path / "cache", tmp_path / "bytes-read"
    result = pxepeer("image", "add", "blank", "--disk", disk, "--key", keys.key,
                     "--cache-dir", cache,
                     argv0=[*READ_COUNTING_PXEPEER, str(disk), str(report)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    # chunk 0 (written zeros) and chunk 100 (data) are read; the 255 holes are not
    assert int(report.read_text()) == 2 * CHUNK
    [signed] = manifests(cache)
    m = signed.manifest
    assert m.boot.kind.value == "disk" and m.boot.kernel is None
    entry = m.file("disk")
    assert entry is not None and entry.size == size
    assert len(entry.chunks) == 257
    assert entry.chunks[-1].size == 4097 and entry.chunks[-1].zero
    assert entry.chunks[0].zero and entry.chunks[0].sha256 == sha(bytes(CHUNK))
    assert [i for i, c in enumerate(entry.chunks) if not c.zero] == [100]
    stored = bytes(3 * MIB) + data
    assert entry.chunks[100].sha256 == sha(stored)
    assert set(chunk_files(cache)) == {sha(stored)}  # zero chunks are not stored
    raw = json.loads((cache / "manifests" / f"{m.manifest_id}.json").read_bytes())
    assert raw["manifest"]["files"][0]["chunks"][0]["zero"] is True
    assert "disk" in result.stderr and "100.0%" in result.stderr.splitlines()[-1]
    verified = ok("image", "verify", "blank", "--cache-dir", cache)
    assert "all 1 chunks verified" in verified.stdout


def test_add_second_version_reuses_existing_chunks(demo: Image, keys: Keys) -> None:
    result = ok(
        "image", "add", "demo", "--kernel", demo.kernel, "--initrd", demo.initrd,
        "--cmdline", "console=ttyS1", "--version", "2", "--key", keys.key,
        "--cache-dir", demo.cache,
    )  # fmt: skip
    assert ", 0 new;" in result.stdout
    assert len(chunk_files(demo.cache)) == 3
    assert sorted(s.manifest.version for s in manifests(demo.cache)) == ["1", "2"]


# -- bad input: one line, exit 2, store untouched ---------------------------------------


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Image:
    """A store holding demo 1; the bad-input cases below must not change it."""
    work = tmp_path_factory.mktemp("populated")
    image = add_demo(work, keys)
    (work / "empty").write_bytes(b"")
    (work / "garbage.key").write_text("this is not a key\n")
    (work / "adir").mkdir()
    return image


BAD_ADD: dict[str, list[str]] = {
    "missing-kernel": ["new", "--kernel", "{w}/nope", "--key", "{key}"],
    "missing-initrd": ["new", "--kernel", "{kernel}", "--initrd", "{w}/nope", "--key", "{key}"],
    "kernel-is-directory": ["new", "--kernel", "{w}/adir", "--key", "{key}"],
    "empty-initrd": ["new", "--kernel", "{kernel}", "--initrd", "{w}/empty", "--key", "{key}"],
    "empty-disk": ["new", "--disk", "{w}/empty", "--key", "{key}"],
    "garbage-key": ["new", "--kernel", "{kernel}", "--key", "{w}/garbage.key"],
    "missing-key": ["new", "--kernel", "{kernel}", "--key", "{w}/nope.key"],
    "key-is-directory": ["new", "--kernel", "{kernel}", "--key", "{w}/adir"],
    "public-key-as-key": ["new", "--kernel", "{kernel}", "--key", "{pub}"],
    "duplicate-name-version": ["demo", "--kernel", "{initrd}", "--key", "{key}"],
    "duplicate-explicit-version": [
        "demo", "--kernel", "{initrd}", "--version", "1", "--key", "{key}",
    ],
    "name-with-slash": ["../evil", "--kernel", "{kernel}", "--key", "{key}"],
    "name-with-space": ["my image", "--kernel", "{kernel}", "--key", "{key}"],
    "name-empty": ["", "--kernel", "{kernel}", "--key", "{key}"],
    "name-too-long": ["x" * 65, "--kernel", "{kernel}", "--key", "{key}"],
    "version-with-slash": ["new", "--kernel", "{kernel}", "--version", "1/2", "--key", "{key}"],
    "initrd-without-kernel": ["new", "--disk", "{kernel}", "--initrd", "{initrd}", "--key",
                              "{key}"],
    "initrd-only": ["new", "--initrd", "{initrd}", "--key", "{key}"],
    "no-files": ["new", "--key", "{key}"],
    "linux-kind-without-kernel": ["new", "--disk", "{kernel}", "--kind", "linux", "--key",
                                  "{key}"],
    "unknown-kind": ["new", "--kernel", "{kernel}", "--kind", "bsd", "--key", "{key}"],
    "unknown-arch": ["new", "--kernel", "{kernel}", "--arch", "sparc", "--key", "{key}"],
    # the imager of each machine's own architecture writes a disk image: it has no CPU
    "arch-of-a-disk-image": ["new", "--disk", "{kernel}", "--arch", "arm64", "--key", "{key}"],
    "unknown-option": ["new", "--kernel", "{kernel}", "--key", "{key}", "--colour"],
    "missing-key-option": ["new", "--kernel", "{kernel}"],
    "missing-name": ["--kernel", "{kernel}", "--key", "{key}"],
    "option-without-value": ["new", "--kernel", "{kernel}", "--key"],
    # the command line becomes one line of the iPXE boot script (pxe/ipxe.render_linux_boot);
    # a newline in it would add iPXE commands of its own
    "cmdline-with-newline": ["new", "--kernel", "{kernel}", "--cmdline", "quiet\nshell",
                             "--key", "{key}"],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ADD))
def test_add_with_bad_input_prints_one_line_exits_2_and_leaves_store_unchanged(
    populated: Image, keys: Keys, case: str
) -> None:
    w = populated.cache.parent
    fill = {"w": str(w), "key": str(keys.key), "pub": str(keys.pub),
            "kernel": str(populated.kernel), "initrd": str(populated.initrd)}  # fmt: skip
    args = [a.format(**fill) for a in BAD_ADD[case]]
    before = snapshot(populated.cache)
    result = pxepeer("image", "add", *args, "--cache-dir", populated.cache)
    assert_one_line_usage_error(result)
    assert result.stdout == ""
    assert snapshot(populated.cache) == before


def test_add_with_bad_input_does_not_create_the_cache_dir(tmp_path: Path, keys: Keys) -> None:
    result = pxepeer("image", "add", "x", "--kernel", tmp_path / "nope", "--key", keys.key,
                     "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert_one_line_usage_error(result)
    assert not (tmp_path / "cache").exists()


def test_add_refuses_duplicate_version_and_leaves_store_unchanged(demo: Image, keys: Keys) -> None:
    before = snapshot(demo.cache)
    (demo.cache.parent / "other").write_bytes(os.urandom(1000))
    result = pxepeer("image", "add", "demo", "--kernel", demo.cache.parent / "other",
                     "--key", keys.key, "--cache-dir", demo.cache)  # fmt: skip
    assert_one_line_usage_error(result)
    assert "already in the store" in result.stderr
    assert snapshot(demo.cache) == before


def test_add_refuses_a_cache_dir_that_is_a_file(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "cache").write_text("not a dir")
    result = pxepeer("image", "add", "x", "--kernel", tmp_path / "k", "--key", keys.key,
                     "--cache-dir", tmp_path / "cache")  # fmt: skip
    assert_one_line_usage_error(result)
    assert (tmp_path / "cache").read_text() == "not a dir"


def test_add_refuses_a_fifo_as_input_without_blocking(populated: Image, keys: Keys) -> None:
    """A FIFO has no size and cannot be chunked twice; with no writer, opening it for
    reading blocks forever (imaging.chunking.file_size via the CLI's _input_file)."""
    fifo = populated.cache.parent / "fifo-noreader"
    if not fifo.exists():
        os.mkfifo(fifo)
    before = snapshot(populated.cache)
    # A blocked open never returns; 15 s, as the CLI's start alone took up to 1.8 s on a
    # loaded 2-core CI host.
    try:
        result = pxepeer("image", "add", "new", "--kernel", populated.kernel, "--initrd", fifo,
                         "--key", keys.key, "--cache-dir", populated.cache,
                         timeout=15)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("pxepeer image add blocked opening a FIFO given as --initrd")
    assert_one_line_usage_error(result)
    assert snapshot(populated.cache) == before


def test_add_refuses_a_fifo_with_a_writer_in_one_line(populated: Image, keys: Keys) -> None:
    """With a writer present the open succeeds and lseek fails with ESPIPE, which
    imaging.chunking.file_size lets escape as a traceback with exit 1."""
    fifo = populated.cache.parent / "fifo-writer"
    if not fifo.exists():
        os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # holds the FIFO open so the reader never blocks
    before = snapshot(populated.cache)
    try:
        result = pxepeer("image", "add", "new", "--kernel", populated.kernel, "--initrd", fifo,
                         "--key", keys.key, "--cache-dir", populated.cache,
                         timeout=15)  # fmt: skip
    finally:
        os.close(writer)
    assert_one_line_usage_error(result)
    assert snapshot(populated.cache) == before


# -- failing half-way -------------------------------------------------------------------

# `pxepeer` with reads of one file (argv[1]) failing like a bad disk: EIO from pread.
UNREADABLE_FILE_PXEPEER = [sys.executable, "-c", """
import errno, os, sys
victim = os.path.realpath(sys.argv[1])
real_pread = os.pread
def pread(fd, n, offset):
    if os.readlink(f"/proc/self/fd/{fd}") == victim:
        raise OSError(errno.EIO, "Input/output error")
    return real_pread(fd, n, offset)
os.pread = pread
from peer.cli import main
sys.argv = ["pxepeer", *sys.argv[2:]]
main(prog_name="pxepeer")
"""]  # fmt: skip


def test_add_failing_on_the_second_file_leaves_no_new_chunk(
    demo: Image, tmp_path: Path, keys: Keys
) -> None:
    kernel = tmp_path / "k2"
    kernel.write_bytes(demo.kernel_bytes + os.urandom(2 * MIB))  # shares chunk 0 with demo
    initrd = tmp_path / "i2"
    initrd.write_bytes(os.urandom(MIB))
    before = snapshot(demo.cache)
    argv0 = [*UNREADABLE_FILE_PXEPEER, str(initrd)]
    result = pxepeer("image", "add", "demo2", "--kernel", kernel, "--initrd", initrd,
                     "--key", keys.key, "--cache-dir", demo.cache, argv0=argv0)  # fmt: skip
    assert_one_line_usage_error(result)
    assert "Input/output error" in result.stderr
    assert snapshot(demo.cache) == before  # demo's own chunks are all still there
    ok("image", "verify", "demo", "--cache-dir", demo.cache)


def test_add_failing_after_the_manifest_is_written_leaves_store_unchanged(
    tmp_path: Path, keys: Keys
) -> None:
    """A store whose keys/ entry is a file: remembering the publisher fails *after* the
    manifest was written (image_add: put_manifest, then _remember_publisher); the rollback
    removes the chunks but not the manifest, leaving an image whose chunks are gone and
    blocking a retry."""
    cache = tmp_path / "cache"
    ok("assign", MAC, "--clear", "--cache-dir", cache)  # creates the store
    (cache / "keys").write_text("in the way\n")
    (tmp_path / "k").write_bytes(os.urandom(1000))
    before = snapshot(cache)
    result = pxepeer("image", "add", "x", "--kernel", tmp_path / "k", "--key", keys.key,
                     "--cache-dir", cache)  # fmt: skip
    assert_one_line_usage_error(result)
    assert snapshot(cache) == before


# -- image list / verify / remove -------------------------------------------------------


def list_rows(cache: Path, *extra: str | Path) -> list[list[str]]:
    out = ok("image", "list", "--cache-dir", cache, *extra).stdout
    return [line.split() for line in out.splitlines()]


def test_list_shows_image_completeness_and_signer(demo: Image, keys: Keys) -> None:
    [header, row] = list_rows(demo.cache)
    assert header == ["NAME", "VERSION", "KIND", "SIZE", "CHUNKS", "SIGNER", "ID"]
    [signed] = manifests(demo.cache)
    key_id = load_public_key(keys.pub).key_id
    assert row == ["demo", "1", "linux", "5.3MiB", "3/3", key_id, signed.manifest.manifest_id[:12]]


def test_list_json_is_machine_readable(demo: Image, keys: Keys) -> None:
    """README: `pxepeer image list [--json]`; the list command has no --json option."""
    result = pxepeer("image", "list", "--json", "--cache-dir", demo.cache)
    assert result.returncode == 0, result.stderr
    assert "demo" in json.dumps(json.loads(result.stdout))


def test_list_of_an_empty_store(tmp_path: Path) -> None:
    assert "no images" in ok("image", "list", "--cache-dir", tmp_path / "c").stdout


def test_verify_of_an_intact_image_exits_0(demo: Image, keys: Keys) -> None:
    result = ok("image", "verify", "demo", "--cache-dir", demo.cache)
    assert "signature good" in result.stdout and "all 3 chunks verified" in result.stdout
    result = ok("image", "verify", "demo", "--trust", keys.pub, "--cache-dir", demo.cache)
    assert "signature good" in result.stdout


def test_verify_reports_a_corrupted_chunk_exits_1_and_removes_it(demo: Image) -> None:
    victim_sha = sha(demo.kernel_bytes[CHUNK:])
    victim = chunk_files(demo.cache)[victim_sha]
    with open(victim, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    result = pxepeer("image", "verify", "demo", "--cache-dir", demo.cache)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"chunk {victim_sha[:16]} corrupt" in result.stdout
    assert "1 of 3 chunks missing or corrupt" in result.stdout
    assert not victim.exists()
    assert len(chunk_files(demo.cache)) == 2
    assert list_rows(demo.cache)[1][4] == "2/3"
    again = pxepeer("image", "verify", "demo", "--cache-dir", demo.cache)
    assert again.returncode == 1 and f"chunk {victim_sha[:16]} missing" in again.stdout


def test_manifest_edited_on_disk_is_not_listed(demo: Image) -> None:
    [path] = (demo.cache / "manifests").iterdir()
    path.write_bytes(path.read_bytes().replace(b"console=ttyS0 quiet", b"init=/bin/sh quiet"))
    listed = ok("image", "list", "--cache-dir", demo.cache)
    assert "no images" in listed.stdout
    assert f"ignoring {path.name}" in listed.stderr  # the admin is told why
    result = pxepeer("image", "verify", "demo", "--cache-dir", demo.cache)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("pxepeer: error: no image demo")
    refused = pxepeer("assign", MAC, "demo", "--cache-dir", demo.cache)
    assert refused.returncode == 2 and "no image demo" in refused.stderr


def test_verify_reports_a_signature_altered_on_disk(demo: Image, keys: Keys) -> None:
    [path] = (demo.cache / "manifests").iterdir()
    doc = json.loads(path.read_bytes())
    doc["signatures"][0]["ed25519"] = base64.b64encode(bytes(64)).decode()
    path.write_text(json.dumps(doc))  # the manifest part, and so its id, are unchanged
    key_id = load_public_key(keys.pub).key_id
    assert list_rows(demo.cache)[1][5] == "UNTRUSTED"
    result = pxepeer("image", "verify", "demo", "--cache-dir", demo.cache)
    assert result.returncode == 1
    assert f"signature BAD: signature by key {key_id} does not match" in result.stdout
    assert "all 3 chunks verified" in result.stdout  # the chunks themselves are fine


def test_image_signed_by_another_key_is_untrusted(
    demo: Image, keys: Keys, other_keys: Keys
) -> None:
    other_id = load_public_key(other_keys.pub).key_id
    [row] = list_rows(demo.cache, "--trust", other_keys.pub)[1:]
    assert row[5] == "UNTRUSTED"
    result = pxepeer("image", "verify", "demo", "--trust", other_keys.pub,
                     "--cache-dir", demo.cache)  # fmt: skip
    assert result.returncode == 1
    assert re.search(r"signature BAD: signed only by untrusted key\(s\) \w+", result.stdout)
    assert load_public_key(keys.pub).key_id in result.stdout
    assert other_id not in result.stdout.split("BAD:")[1]


def test_image_added_with_another_key_is_reported_bad_when_trusting_only_the_first(
    demo: Image, other_keys: Keys, keys: Keys
) -> None:
    ok("image", "add", "rogue", "--kernel", demo.initrd, "--key", other_keys.key,
       "--cache-dir", demo.cache)  # fmt: skip
    rows = {r[0]: r for r in list_rows(demo.cache, "--trust", keys.pub)[1:]}
    assert rows["demo"][5] == load_public_key(keys.pub).key_id
    assert rows["rogue"][5] == "UNTRUSTED"
    result = pxepeer("image", "verify", "rogue", "--trust", keys.pub, "--cache-dir", demo.cache)
    assert result.returncode == 1
    assert "signature BAD" in result.stdout and "untrusted" in result.stdout


def test_verify_with_a_bad_trust_file_is_one_line_exit_2(demo: Image, keys: Keys) -> None:
    before = snapshot(demo.cache)
    result = pxepeer("image", "verify", "demo", "--trust", keys.key, "--cache-dir", demo.cache)
    assert_one_line_usage_error(result)
    assert snapshot(demo.cache) == before


def test_verify_of_an_unknown_image_is_one_line_exit_2(demo: Image) -> None:
    assert_one_line_usage_error(pxepeer("image", "verify", "nope", "--cache-dir", demo.cache))
    assert_one_line_usage_error(
        pxepeer("image", "verify", "demo", "--version", "9", "--cache-dir", demo.cache)
    )


def test_remove_frees_chunks_no_other_image_uses(demo: Image, keys: Keys) -> None:
    ok("image", "add", "kernel-only", "--kernel", demo.kernel, "--key", keys.key,
       "--cache-dir", demo.cache)  # fmt: skip
    result = ok("image", "remove", "demo", "--cache-dir", demo.cache)
    assert "1 chunks freed" in result.stdout  # the initrd; the kernel chunks are shared
    assert set(chunk_files(demo.cache)) == {
        sha(demo.kernel_bytes[:CHUNK]),
        sha(demo.kernel_bytes[CHUNK:]),
    }
    assert [s.manifest.name for s in manifests(demo.cache)] == ["kernel-only"]
    ok("image", "verify", "kernel-only", "--cache-dir", demo.cache)
    assert_one_line_usage_error(pxepeer("image", "remove", "demo", "--cache-dir", demo.cache))


# -- assign -----------------------------------------------------------------------------


def test_assign_list_and_clear(demo: Image) -> None:
    result = ok("assign", "52-54-00-AB-CD-EF", "demo", "--cache-dir", demo.cache)
    assert result.stdout.strip() == f"{MAC} -> demo"
    assert ok("assign", "--list", "--cache-dir", demo.cache).stdout == f"{MAC}  demo\n"
    assert ok("assign", MAC.upper(), "--clear", "--cache-dir", demo.cache).stdout.strip() == (
        f"{MAC}: cleared"
    )
    assert ok("assign", "--list", "--cache-dir", demo.cache).stdout == ""
    again = ok("assign", MAC, "--clear", "--cache-dir", demo.cache)
    assert "was not assigned" in again.stdout


def test_assign_refuses_an_image_not_in_the_store(demo: Image) -> None:
    before = snapshot(demo.cache)
    result = pxepeer("assign", MAC, "ghost", "--cache-dir", demo.cache)
    assert_one_line_usage_error(result)
    assert "no image ghost" in result.stderr
    assert snapshot(demo.cache) == before


def test_assign_with_bad_input_does_not_create_a_store(tmp_path: Path) -> None:
    """open_store runs before the arguments are checked (in the assign command), so a bad MAC
    makes an empty store skeleton where there was nothing."""
    assert_one_line_usage_error(pxepeer("assign", "not-a-mac", "x", "--cache-dir", tmp_path / "c"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["52:54:00:ab:cd", "demo"],
        ["not-a-mac", "--clear"],
        [MAC],
        [],
        ["--list", MAC],
        [MAC, "demo", "--clear"],
        [MAC, "demo", "extra"],
        [MAC, "demo", "--force"],
    ],
    ids=["short-mac", "clear-bad-mac", "no-image", "nothing", "list-with-mac", "clear-with-image",
         "extra-arg", "unknown-option"],
)  # fmt: skip
def test_assign_with_bad_input_is_one_line_exit_2_and_changes_nothing(
    demo: Image, args: list[str]
) -> None:
    ok("assign", "52:54:00:00:00:01", "demo", "--cache-dir", demo.cache)
    before = snapshot(demo.cache)
    assert_one_line_usage_error(pxepeer("assign", *args, "--cache-dir", demo.cache))
    assert snapshot(demo.cache) == before


def test_assign_to_local_disk_needs_no_image(demo: Image) -> None:
    """README: `pxepeer assign MAC IMAGE` with `local` = boot the local disk, and
    pxe/boot_policy.py treats the assignment "local" so. The assign command refuses it."""
    ok("assign", MAC, "local", "--cache-dir", demo.cache)
    assert ok("assign", "--list", "--cache-dir", demo.cache).stdout == f"{MAC}  local\n"


def test_cache_dir_comes_from_the_environment(demo: Image, tmp_path: Path) -> None:
    env = {**os.environ, "PXEPEER_CACHE_DIR": str(demo.cache)}
    result = subprocess.run([*PXEPEER, "image", "list"], capture_output=True, text=True,
                            env=env, timeout=20)  # fmt: skip
    assert result.returncode == 0 and "demo" in result.stdout


# -- publish ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Image:
    """A store holding demo 1 to publish from (publishing only reads it)."""
    return add_demo(tmp_path_factory.mktemp("shop"), keys)


def publish(
    image: Image, keys: Keys, origin: Path, *extra: str | Path
) -> subprocess.CompletedProcess[str]:
    return pxepeer("publish", "demo", "--to", origin, "--key", keys.key,
                   "--cache-dir", image.cache, *extra)  # fmt: skip


def origin_catalog(origin: Path) -> Catalog:
    return SignedCatalog.from_bytes((origin / CATALOG).read_bytes()).catalog


def put_catalog(origin: Path, key: Path, serial: int, *, issued: int, expires: int) -> None:
    origin.mkdir(parents=True, exist_ok=True)
    old = Catalog(serial, issued, expires, (CatalogEntry("old", "1", "d" * 64),))
    (origin / CATALOG).write_bytes(SignedCatalog.sign(old, load_signing_key(key)).to_bytes())


def test_publish_writes_served_files_atomically_and_each_publish_grows_the_serial(
    shop: Image, keys: Keys, tmp_path: Path
) -> None:
    origin = tmp_path / "www" / "origin"
    result = publish(shop, keys, origin)
    assert result.returncode == 0, result.stderr
    assert "catalog serial 1," in result.stdout
    signed = SignedCatalog.from_bytes((origin / CATALOG).read_bytes())
    trusted = TrustedKeys([load_public_key(keys.pub)])
    assert trusted.check(signed.catalog.canonical_bytes, signed.signatures)
    [entry] = signed.catalog.entries
    [manifest] = manifests(shop.cache)
    assert entry.manifest_id == manifest.manifest.manifest_id
    served = [origin / CATALOG, origin / manifest_path(entry.manifest_id)]
    served += [origin / chunk_path(r.sha256) for r in manifest.manifest.chunk_refs()]
    files = sorted(p for p in origin.rglob("*") if p.is_file())
    assert files == sorted(served)  # no temp file left beside them
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}  # for the web server
    assert publish(shop, keys, origin).returncode == 0
    assert origin_catalog(origin).serial == 2


def test_publish_counts_on_from_a_held_catalog_signed_by_another_key_and_expired(
    shop: Image, keys: Keys, other_keys: Keys, tmp_path: Path
) -> None:
    """Peers that saw serial 7 refuse anything at or below it, whoever signed it."""
    origin = tmp_path / "origin"
    put_catalog(origin, other_keys.key, 7, issued=1000, expires=2000)
    result = publish(shop, keys, origin)
    assert result.returncode == 0, result.stderr
    catalog = origin_catalog(origin)
    assert catalog.serial == 8
    assert sorted(e.name for e in catalog.entries) == ["demo", "old"]


def test_publish_with_serial_continues_a_lost_origin(
    shop: Image, keys: Keys, tmp_path: Path
) -> None:
    origin = tmp_path / "new-origin"
    assert publish(shop, keys, origin, "--serial", "41").returncode == 0
    assert origin_catalog(origin).serial == 41
    assert publish(shop, keys, origin).returncode == 0
    assert origin_catalog(origin).serial == 42


@pytest.mark.parametrize("serial", ["5", "3"], ids=["equal", "below"])
def test_publish_with_a_serial_not_above_the_held_one_is_refused_and_writes_nothing(
    shop: Image, keys: Keys, tmp_path: Path, serial: str
) -> None:
    origin = tmp_path / "origin"
    assert publish(shop, keys, origin, "--serial", "5").returncode == 0
    before = snapshot(origin)
    result = publish(shop, keys, origin, "--serial", serial)
    assert_one_line_usage_error(result)
    assert f"serial {serial} is not above the serial the origin holds (5)" in result.stderr
    assert snapshot(origin) == before


GARBLED_CATALOGS = {
    "empty": b"",
    "truncated": b'{"catalog": {"format": "pxepeer-catalog/1", "serial": 9',
    "not-a-catalog": b'{"catalog": 1, "signatures": []}',
    "non-finite-serial": b'{"catalog": {"serial": 1e999}, "signatures": []}',
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("case", sorted(GARBLED_CATALOGS))
def test_publish_refuses_a_garbled_origin_catalog_unless_given_a_serial(
    shop: Image, keys: Keys, tmp_path: Path, case: str
) -> None:
    """Its serial is unknown, so no serial can be known to be above it."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / CATALOG).write_bytes(GARBLED_CATALOGS[case])
    before = snapshot(origin)
    result = publish(shop, keys, origin)
    assert_one_line_usage_error(result)
    assert "unreadable" in result.stderr and "--serial" in result.stderr
    assert snapshot(origin) == before
    assert publish(shop, keys, origin, "--serial", "12").returncode == 0
    catalog = origin_catalog(origin)
    assert catalog.serial == 12 and [e.name for e in catalog.entries] == ["demo"]


def test_publish_refuses_an_origin_catalog_that_cannot_be_read(
    shop: Image, keys: Keys, tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    (origin / CATALOG).mkdir(parents=True)
    result = publish(shop, keys, origin)
    assert_one_line_usage_error(result)
    assert "unreadable" in result.stderr
    assert snapshot(origin) == {} and [p.name for p in origin.iterdir()] == [CATALOG]


@pytest.mark.parametrize(
    "args",
    [["--serial", "0"], ["--serial", "-3"], ["--serial", "x"], ["--serial", str(2**53)],
     ["--priority", str(10**7)], ["--replicas", "-1"]],
    ids=["serial-zero", "serial-negative", "serial-text", "serial-too-big", "priority-too-big",
         "replicas-negative"],
)  # fmt: skip
def test_publish_with_out_of_range_options_is_refused_and_creates_no_origin(
    shop: Image, keys: Keys, tmp_path: Path, args: list[str]
) -> None:
    assert_one_line_usage_error(publish(shop, keys, tmp_path / "origin", *args))
    assert not (tmp_path / "origin").exists()


def test_publish_to_a_file_is_refused(shop: Image, keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "origin").write_text("x")
    result = publish(shop, keys, tmp_path / "origin")
    assert_one_line_usage_error(result)
    assert (tmp_path / "origin").read_text() == "x"


# -- usage ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["frob"], ["image", "frob"], ["keys", "new", "--frob"]])
def test_unknown_command_or_option_is_one_line_exit_2(args: list[str]) -> None:
    result = pxepeer(*args)
    assert_one_line_usage_error(result)
    assert "--help" in result.stderr


def test_group_without_a_command_shows_its_help_readably() -> None:
    """`pxepeer image` with no subcommand: Click raises NoArgsIsHelpError (a UsageError),
    and OneLineErrors.main (peer/cli.py) flattens the whole help text into one
    'pxepeer: error: Usage: ...' line."""
    result = pxepeer("image")
    text = result.stdout + result.stderr
    assert "error" not in text
    assert any(line.split()[:1] == ["verify"] for line in text.splitlines()), text
