"""OS images: a directory tree of real files whose pages fill a simulated page cache.

An :class:`Image` is built by walking a tree (``/usr/lib`` by default, present on every Linux
machine) in sorted order and keeping regular files until a file or byte cap is reached, so
start-up costs only ``stat`` calls. File pages are read lazily, on demand, with ``os.pread``;
the last page of a file is padded with zeros as a kernel page cache would. Several guests
built on the same :class:`Image` see byte-identical file pages, which is what makes
cross-guest deduplication show up.

    image = Image.scan("/usr/lib", max_files=2000, max_bytes=64 << 20)
    page = image.read_page(image.locate(1234))   # 4096 bytes
"""

from __future__ import annotations

import bisect
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from schemas.batch import PAGE_SIZE

from .errors import ImageError

DEFAULT_IMAGE = "/usr/lib"
ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class ImageFile:
    """One regular file of an image: its path, size in bytes and number of pages."""

    path: str
    size: int
    pages: int


@dataclass(frozen=True, slots=True)
class FilePage:
    """Where a page of the image lives: file number (the inode of the simulated fs) and index."""

    file_no: int
    index: int


class Image:
    """A fixed, ordered list of files; page ``n`` of the image is a page of one of them."""

    def __init__(self, root: str, files: list[ImageFile]) -> None:
        if not files:
            raise ImageError(f"no readable regular file with content under {root}")
        self.root = root
        self.files = files
        # starts[i] is the image page number of page 0 of file i: O(log n) lookups.
        self._starts: list[int] = []
        total = 0
        for f in files:
            self._starts.append(total)
            total += f.pages
        self.total_pages = total

    @classmethod
    def scan(
        cls, root: str | os.PathLike[str], *, max_files: int = 2000, max_bytes: int = 64 << 20
    ) -> Image:
        """Walk ``root`` in sorted order, keeping regular non-empty readable files.

        Symbolic links are not followed (a file is counted once) and the walk stops at
        ``max_files`` files or once ``max_bytes`` bytes are kept, so the same tree on the same
        machine always gives the same image.
        """
        root_s = os.fspath(root)
        if not os.path.isdir(root_s):
            raise ImageError(f"image root {root_s} is not a directory")
        files: list[ImageFile] = []
        kept = 0
        for dirpath, dirnames, filenames in os.walk(root_s, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if len(files) >= max_files or kept >= max_bytes:
                    return cls(root_s, files)
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    continue
                if not os.access(path, os.R_OK):
                    continue
                size = min(st.st_size, max_bytes - kept)
                pages = -(-size // PAGE_SIZE)
                files.append(ImageFile(path, size, pages))
                kept += pages * PAGE_SIZE
        return cls(root_s, files)

    def locate(self, page_no: int) -> FilePage:
        """The file and page index of image page ``page_no`` (0 ≤ page_no < total_pages)."""
        if not 0 <= page_no < self.total_pages:
            raise IndexError(page_no)
        i = bisect.bisect_right(self._starts, page_no) - 1
        return FilePage(i, page_no - self._starts[i])

    def page_no(self, fp: FilePage) -> int:
        """Inverse of :meth:`locate`."""
        return self._starts[fp.file_no] + fp.index

    def read_page(self, fp: FilePage) -> bytes:
        """The 4096 bytes of a file page, read now; a short tail is padded with zeros."""
        f = self.files[fp.file_no]
        try:
            fd = os.open(f.path, os.O_RDONLY)
        except OSError as exc:
            raise ImageError(f"cannot read {f.path}: {exc}") from exc
        try:
            data = os.pread(fd, PAGE_SIZE, fp.index * PAGE_SIZE)
        finally:
            os.close(fd)
        if len(data) < PAGE_SIZE:
            data += bytes(PAGE_SIZE - len(data))
        return data

    def describe(self) -> str:
        """One line for reports: root, files and size."""
        return f"{self.root}: {len(self.files)} files, {self.total_pages} pages"


def read_file_page(path: str | Path, index: int) -> bytes:
    """Read page ``index`` of a file directly (zero-padded): an independent check of images."""
    with open(path, "rb") as fh:
        fh.seek(index * PAGE_SIZE)
        data = fh.read(PAGE_SIZE)
    return data + bytes(PAGE_SIZE - len(data))
