from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_agent.sim.errors import ImageError
from guest_agent.sim.images import Image, read_file_page

pytestmark = pytest.mark.timeout(30)


def test_scan_is_sorted_and_repeatable(image_tree: Path) -> None:
    a = Image.scan(image_tree)
    b = Image.scan(image_tree)
    assert [f.path for f in a.files] == [f.path for f in b.files]
    rel = [os.path.relpath(f.path, image_tree) for f in a.files]
    # os.walk with sorted dirs and names: directory by directory, names sorted inside
    assert rel == sorted(rel, key=lambda p: (os.path.dirname(p), os.path.basename(p)))
    assert a.total_pages == sum(f.pages for f in a.files) > 0


def test_caps_limit_files_and_bytes(image_tree: Path) -> None:
    few = Image.scan(image_tree, max_files=5)
    assert len(few.files) == 5
    small = Image.scan(image_tree, max_bytes=64 << 10)
    assert small.total_pages <= 16
    assert small.total_pages >= 1


def test_pages_are_the_file_bytes_zero_padded(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A" * 5000)
    (tmp_path / "b").write_bytes(b"B" * 4096)
    img = Image.scan(tmp_path)
    assert [f.pages for f in img.files] == [2, 1]
    p1 = img.read_page(img.locate(1))
    assert p1 == b"A" * 904 + bytes(4096 - 904)
    assert img.read_page(img.locate(2)) == b"B" * 4096
    for n in range(img.total_pages):
        fp = img.locate(n)
        assert img.page_no(fp) == n
        assert img.read_page(fp) == read_file_page(img.files[fp.file_no].path, fp.index)
    with pytest.raises(IndexError):
        img.locate(3)


def test_symlinks_and_empty_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x" * 10)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    img = Image.scan(tmp_path)
    assert [Path(f.path).name for f in img.files] == ["real"]


def test_missing_or_empty_tree_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        Image.scan(tmp_path / "nope")
    with pytest.raises(ImageError):
        Image.scan(tmp_path)
