"""Fixtures for the QEMU lab: the test image (built once per session), a virtual store per
test, and a pxepeer content store holding the signed test image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.boot_servers import (
    IMAGE_NAME,
    MACS,
    PxepeerStore,
    TestImage,
    X86Imager,
    build_demo_os,
    build_test_image,
    build_x86_imager,
    prepare_pxepeer_store,
)
from tests.lab.virtual_store import VirtualStore, lab_skip_reason, remove_stale_namespaces

LAB_DIR = Path(__file__).parent

_skip_reason = lab_skip_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
            if _skip_reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"lab: {_skip_reason}"))


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("netboot-test"))


@pytest.fixture(scope="session")
def pxepeer_store(tmp_path_factory: pytest.TempPathFactory, test_image: TestImage) -> PxepeerStore:
    """Keys, the test image signed into a cache, and every lab MAC assigned to it."""
    return prepare_pxepeer_store(
        tmp_path_factory.mktemp("pxepeer-store"),
        test_image,
        {mac: IMAGE_NAME for mac in MACS.values()},
    )


@pytest.fixture(scope="session")
def x86_imager(tmp_path_factory: pytest.TempPathFactory) -> X86Imager:
    """One x86 imager build for every lab module that images a disk."""
    return build_x86_imager(tmp_path_factory.mktemp("x86-imager"))


@pytest.fixture(scope="session")
def demo_os_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo OS build (~14 s) for test_imaging and test_secure_boot."""
    return build_demo_os(tmp_path_factory.mktemp("demo-os"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[VirtualStore]:
    """A fresh virtual store (namespaces, bridge; no router started yet), torn down after."""
    remove_stale_namespaces()
    with VirtualStore(tmp_path / "lab") as store:
        yield store
