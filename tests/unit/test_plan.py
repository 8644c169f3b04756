"""The imaging plan: what the agent writes where, and which peers to fetch each chunk from."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest
from imaging.plan import (
    FORMAT_LINE,
    ChunksUnavailable,
    NoDiskImage,
    Plan,
    PlanChunk,
    PlanError,
    build_plan,
    imager_cmdline,
    rotated,
)

A, B, C = (hashlib.sha256(bytes([i])).hexdigest() for i in range(3))
Z4 = hashlib.sha256(bytes(4)).hexdigest()
Z2 = hashlib.sha256(bytes(2)).hexdigest()
P1, P2, P3 = "http://10.77.0.2:8080", "http://10.77.0.3:8080", "http://10.77.0.4:8080"
AGENT = Path(__file__).resolve().parents[2] / "imaging" / "agent" / "pxepeer-agent.sh"


def disk_image(name: str = "demo-os", version: str = "1") -> Manifest:
    # chunks: A | zero | B | A again (same content twice) | zero (short, at the end)
    disk = FileEntry(
        "disk",
        18,
        "d" * 64,
        (
            ChunkRef(A, 4),
            ChunkRef(Z4, 4, zero=True),
            ChunkRef(B, 4),
            ChunkRef(A, 4),
            ChunkRef(Z2, 2, zero=True),
        ),
    )
    return Manifest(name, version, BootSpec(ImageKind.DISK), (disk,), chunk_size=4)


def test_plan_lists_every_chunk_with_its_offset_and_zero_chunks_need_no_peer() -> None:
    plan = build_plan(disk_image(), {0: [P1], 2: [P2, P1], 3: [P1]})

    assert plan.disk_size == 18 and plan.chunk_size == 4
    assert [(c.offset, c.size, c.zero) for c in plan.chunks] == [
        (0, 4, False), (4, 4, True), (8, 4, False), (12, 4, False), (16, 2, True),
    ]  # fmt: skip
    assert plan.peers == (P1, P2)
    assert [c.peers for c in plan.chunks] == [(0,), (), (1, 0), (0,), ()]
    assert plan.data_bytes == 12 and len(plan.data_chunks) == 3


def test_rendered_plan_is_line_based_and_ends_with_the_chunk_count() -> None:
    manifest = disk_image()
    text = build_plan(manifest, {0: [P1], 2: [P2, P1], 3: [P1]}).render()

    assert text.splitlines() == [
        FORMAT_LINE,
        f"image {manifest.manifest_id} 1 demo-os",
        f"disk 18 {'d' * 64}",
        "chunk_size 4",
        f"peer 0 {P1}",
        f"peer 1 {P2}",
        f"chunk 0 4 {A} 0",
        f"chunk 4 4 {Z4} zero",
        f"chunk 8 4 {B} 1,0",
        f"chunk 12 4 {A} 0",
        f"chunk 16 2 {Z2} zero",
        "end 5",
    ]


def test_a_plan_parses_back_to_the_same_plan() -> None:
    plan = build_plan(disk_image("name with spaces"), {0: [P3, P1], 2: [P2], 3: [P1, P2, P3]})
    assert Plan.parse(plan.render()) == plan


SECRET = "0123456789abcdef" * 2


def test_a_plan_with_a_job_secret_renders_it_after_chunk_size_and_parses_back() -> None:
    plan = build_plan(disk_image(), {0: [P1], 2: [P2, P1], 3: [P1]}, job=SECRET)
    lines = plan.render().splitlines()

    assert lines[3:5] == ["chunk_size 4", f"job {SECRET}"]
    assert Plan.parse(plan.render()) == plan and Plan.parse(plan.render()).job == SECRET
    # Without one (a GET preview, an older server) there is no job line at all.
    plain = build_plan(disk_image(), {0: [P1], 2: [P2, P1], 3: [P1]})
    assert plain.job is None
    assert not any(line.startswith("job") for line in plain.render().splitlines())
    assert Plan.parse(plain.render()).job is None


@pytest.mark.parametrize(
    "job",
    ["", SECRET.upper(), SECRET[:-1], SECRET + "0", "g" * 32, f"{SECRET[:16]} {SECRET[16:]}"],
)
def test_a_malformed_job_secret_is_refused_when_built_and_when_parsed(job: str) -> None:
    with pytest.raises(PlanError, match="secret"):
        build_plan(disk_image(), {0: [P1], 2: [P1], 3: [P1]}, job=job)
    text = build_plan(disk_image(), {0: [P1], 2: [P1], 3: [P1]}, job=SECRET).render()
    with pytest.raises(PlanError):
        Plan.parse(text.replace(f"job {SECRET}", f"job {job}"))


@pytest.mark.parametrize("keyword", ["image", "disk", "chunk_size", "job"])
def test_a_header_line_given_twice_is_refused(keyword: str) -> None:
    lines = build_plan(disk_image(), {0: [P1], 2: [P1], 3: [P1]}, job=SECRET).render().splitlines()
    [line] = [x for x in lines if x.split(" ")[0] == keyword]
    with pytest.raises(PlanError, match="two"):
        Plan.parse("\n".join([*lines[:2], line, *lines[2:]]) + "\n")


def test_image_without_a_disk_file_has_no_plan() -> None:
    kernel = FileEntry("kernel", 4, A, (ChunkRef(A, 4),))
    imager = Manifest("imager", "1", BootSpec(ImageKind.IMAGER, kernel="kernel"), (kernel,))
    with pytest.raises(NoDiskImage, match="imager 1 has no disk image"):
        build_plan(imager, {0: [P1]})


def test_a_data_chunk_no_peer_holds_refuses_the_plan() -> None:
    with pytest.raises(ChunksUnavailable, match="1 of 3 data chunks") as caught:
        build_plan(disk_image(), {0: [P1], 3: [P1]})
    assert caught.value.missing == (2,)


def test_same_url_listed_twice_for_a_chunk_appears_once_and_trailing_slash_is_dropped() -> None:
    plan = build_plan(disk_image(), {0: [P1, P1 + "/"], 2: [P1], 3: [P1]})
    assert plan.peers == (P1,)
    assert plan.chunks[0].peers == (0,)


@pytest.mark.parametrize("url", ["http://a b:80", "ftp://x", "http://x/$(reboot)", "http://x\n"])
def test_peer_urls_that_could_break_the_agents_command_lines_are_refused(url: str) -> None:
    with pytest.raises(PlanError, match="peer URL"):
        build_plan(disk_image(), {0: [url], 2: [P1], 3: [P1]})


def test_a_name_with_a_newline_cannot_go_into_a_plan() -> None:
    with pytest.raises(PlanError, match="image name"):
        build_plan(disk_image("two\nlines"), {0: [P1], 2: [P1], 3: [P1]})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda lines: lines[:-1],  # cut short: no end line
        lambda lines: [*lines[:-2], lines[-1]],  # a chunk line lost
        lambda lines: ["pxepeer-plan 2", *lines[1:]],
        lambda lines: [*lines, "chunk 0 4 x 0"],  # something after end
        lambda lines: [line.replace(" 1,0", " 7") for line in lines],  # unknown peer
        lambda lines: [*lines[:3], *lines[4:]],  # no chunk_size
    ],
)
def test_damaged_plans_do_not_parse(mutate) -> None:
    lines = build_plan(disk_image(), {0: [P1], 2: [P2, P1], 3: [P1]}).render().splitlines()
    with pytest.raises(PlanError):
        Plan.parse("\n".join(mutate(lines)) + "\n")


def test_rotation_gives_each_chunk_a_different_first_peer() -> None:
    peers = [P1, P2, P3]
    assert [rotated(peers, i)[0] for i in range(4)] == [P1, P2, P3, P1]
    assert sorted(rotated(peers, 5)) == sorted(peers)
    assert rotated([], 3) == []


def test_plan_chunk_defaults_to_no_peers() -> None:
    assert PlanChunk(0, 4, A, True).peers == ()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox is not installed")
def test_the_agent_reads_a_rendered_plan(tmp_path: Path) -> None:
    """The agent's own plan reader (busybox ash) sees the chunks and peers of a plan."""
    plan_file = tmp_path / "plan"
    plan_file.write_text(build_plan(disk_image(), {0: [P1], 2: [P2, P1], 3: [P1]}).render())
    result = subprocess.run(
        ["/bin/busybox", "sh", str(AGENT), "--check-plan", str(plan_file)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "chunks=5", "data=3", "peers=2", "size=18", "bytes=12", "job=no",
    ]  # fmt: skip


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox is not installed")
@pytest.mark.parametrize("job", [SECRET, None])
def test_the_agent_reads_a_plan_with_or_without_a_job_line(tmp_path: Path, job: str | None) -> None:
    plan_file = tmp_path / "plan"
    plan_file.write_text(build_plan(disk_image(), {0: [P1], 2: [P1], 3: [P1]}, job=job).render())
    result = subprocess.run(
        ["/bin/busybox", "sh", str(AGENT), "--check-plan", str(plan_file)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"job={'yes' if job else 'no'}" in result.stdout.split()
    assert SECRET not in result.stdout + result.stderr  # never printed


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox is not installed")
@pytest.mark.parametrize(
    "bad",
    [
        f"job {SECRET.upper()}",
        f"job {SECRET} x",
        "job",
        f"job {SECRET[:-1]}",
        f"job {SECRET}\njob {SECRET}",  # twice
    ],
)
def test_the_agent_refuses_a_malformed_or_second_job_line(tmp_path: Path, bad: str) -> None:
    text = build_plan(disk_image(), {0: [P1], 2: [P1], 3: [P1]}, job=SECRET).render()
    plan_file = tmp_path / "plan"
    plan_file.write_text(text.replace(f"job {SECRET}", bad))
    result = subprocess.run(
        ["/bin/busybox", "sh", str(AGENT), "--check-plan", str(plan_file)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert SECRET[:8] not in result.stdout + result.stderr  # not even a part of it


def test_imager_cmdline_adds_server_and_image_last() -> None:
    assert imager_cmdline("console=ttyS0 quiet", P1 + "/", "a" * 64) == (
        f"console=ttyS0 quiet pxepeer.server={P1} pxepeer.image={'a' * 64}"
    )
    assert imager_cmdline("", P2) == f"pxepeer.server={P2}"


@pytest.mark.parametrize(("server", "image"), [("http://x y", None), (P1, "a b"), (P1, "$(x)")])
def test_imager_cmdline_refuses_what_could_split_or_inject(server: str, image: str | None) -> None:
    with pytest.raises(PlanError):
        imager_cmdline("console=ttyS0", server, image)
