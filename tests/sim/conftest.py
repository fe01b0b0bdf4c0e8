"""Fixtures of the simulator tests: a small image of real files copied from /usr/lib, so the
page contents are real but cannot change under a test (a package upgrade elsewhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guest_agent.sim.images import DEFAULT_IMAGE, Image


def copy_image(dest: Path, *, max_files: int = 120, max_bytes: int = 3 << 20) -> Path:
    """Copy the first files of /usr/lib (sorted walk) into ``dest`` and return it."""
    src = Image.scan(DEFAULT_IMAGE, max_files=max_files, max_bytes=max_bytes)
    for i, f in enumerate(src.files):
        target = dest / f"d{i % 7}" / f"{i:04d}-{Path(f.path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, target)
    return dest


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_image(tmp_path_factory.mktemp("image"))
