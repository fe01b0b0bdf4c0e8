"""The read-only base image a copy-on-write export serves its unwritten blocks from.

::

    image = BaseImage.open("/var/lib/images/golden.raw")           # identity from stat + header
    image = BaseImage.open(path, identity="content")                # or from the whole content
    blocks = image.read_blocks([0, 1, 2])                           # 4 KiB each, zero-padded
    image.cache_tag                                                  # 128-bit key of this version

A raw image only (qcow2: convert it once with ``qemu-img convert -O raw``). The image is opened
read-only and must not change while an export serves it. :meth:`BaseImage.check` compares the
open file's size and mtime with those seen at open (every read does this, it is one ``fstat``)
and, at most once per ``header_check_s``, the digest of its first MiB; a change raises
:class:`BaseImageChanged` from then on, for good: the export answers reads it cannot serve
with ``EIO`` and logs why, rather than mixing two versions of a disk.

:attr:`BaseImage.cache_tag` names the image's content version in the shared cache's handles,
so two images with different bytes at the same offset never meet at one handle. With
``identity="stat"`` (the default) it is a digest of the device, inode, size, mtime and header
digest: free to compute, and it changes whenever the file is written (a new version gets new
handles; the old ones are never read again and age out of the cache). With
``identity="content"`` it is a digest of every byte, read once at open: exports over copies of
one image (other paths, other hosts) then share their cached blocks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Literal

from guest_agent.nbd.backend import BLOCK_SIZE, ZERO_BLOCK
from guest_agent.nbd.errors import BackendError

log = logging.getLogger(__name__)

HEADER_BYTES = 1 << 20
_READ_CHUNK = 4 << 20

Identity = Literal["stat", "content"]


class BaseImageChanged(BackendError):
    """The base image changed under a running export; its blocks are no longer served."""


@dataclass(frozen=True)
class ImageVersion:
    """What identifies one version of the image file (compared on every check)."""

    size: int
    mtime_ns: int
    header_digest: str


class BaseImage:
    """A read-only raw image, read by whole 4 KiB blocks, refusing to serve once changed.

    Use :meth:`open`; :meth:`read_blocks` returns the blocks' bytes (a block past the end of
    the file reads as zeros, the last partial block is zero-padded) or raises
    :class:`BaseImageChanged`. ``reads`` and ``read_bytes`` count the blocks and bytes read.
    """

    def __init__(
        self,
        path: str,
        fd: int,
        version: ImageVersion,
        cache_tag: int,
        *,
        header_check_s: float = 1.0,
    ) -> None:
        self.path = path
        self._fd = fd
        self.version = version
        self.size = version.size
        self.cache_tag = cache_tag
        self.header_check_s = header_check_s
        self._header_checked = time.monotonic()
        self._changed: str | None = None
        self.reads = 0
        self.read_bytes = 0
        # reads run in worker threads, several at once: their counts are added under a lock
        self._count_lock = threading.Lock()

    @classmethod
    def open(
        cls, path: str, *, identity: Identity = "stat", header_check_s: float = 1.0
    ) -> BaseImage:
        """Open ``path`` read-only and take its identity; ``OSError`` when it cannot be read,
        ``ValueError`` when it is not a regular file."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not a regular file (a raw image is needed)")
            version = ImageVersion(st.st_size, st.st_mtime_ns, _header_digest(fd))
            if identity == "content":
                digest = hashlib.blake2b(digest_size=16, person=b"tmem-base-cont")
                offset = 0
                while chunk := os.pread(fd, _READ_CHUNK, offset):
                    digest.update(chunk)
                    offset += len(chunk)
                digest.update(st.st_size.to_bytes(8, "big"))
            else:
                digest = hashlib.blake2b(digest_size=16, person=b"tmem-base-stat")
                for number in (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                    digest.update(number.to_bytes(16, "big"))
                digest.update(version.header_digest.encode())
            image = cls(
                path,
                fd,
                version,
                int.from_bytes(digest.digest(), "big"),
                header_check_s=header_check_s,
            )
            # the content digest read the whole file: make sure it did not change meanwhile
            image.check(force_header=True)
        except BaseException:
            os.close(fd)
            raise
        return image

    @property
    def block_count(self) -> int:
        """Blocks holding image bytes (the last one may be partial)."""
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    @property
    def changed(self) -> str | None:
        """Why the image is refused, or ``None`` while it is the version opened."""
        return self._changed

    def check(self, *, force_header: bool = False) -> None:
        """Raise :class:`BaseImageChanged` when the file is not the version opened."""
        if self._changed is not None:
            raise BaseImageChanged(self._changed)
        st = os.fstat(self._fd)
        why = None
        if st.st_size != self.version.size:
            why = f"size {self.version.size} -> {st.st_size}"
        elif st.st_mtime_ns != self.version.mtime_ns:
            why = f"mtime {self.version.mtime_ns} -> {st.st_mtime_ns} ns"
        else:
            now = time.monotonic()
            if force_header or now - self._header_checked >= self.header_check_s:
                self._header_checked = now
                if _header_digest(self._fd) != self.version.header_digest:
                    why = "its first MiB changed"
        if why is not None:
            self._changed = f"base image {self.path} changed under the export ({why}); refusing"
            log.error("nbd: %s", self._changed)
            raise BaseImageChanged(self._changed)

    def read_blocks(self, blocks: list[int]) -> list[bytes]:
        """The blocks' bytes, in order; checks the image before and after reading."""
        self.check()
        out: list[bytes] = []
        size = self.size
        fd = self._fd
        read = nbytes = 0
        for block in blocks:
            offset = block * BLOCK_SIZE
            if offset >= size:
                out.append(ZERO_BLOCK)
                continue
            try:
                data = os.pread(fd, BLOCK_SIZE, offset)
            except OSError as exc:
                raise BackendError(f"read of {self.path} at {offset} failed: {exc}") from exc
            read += 1
            nbytes += len(data)
            if len(data) != BLOCK_SIZE:
                if offset + len(data) != size:
                    raise BackendError(f"short read of {self.path} at {offset}")
                data += bytes(BLOCK_SIZE - len(data))
            out.append(data)
        with self._count_lock:
            self.reads += read
            self.read_bytes += nbytes
        # a write racing the reads above shows here: the bytes just read are not served (nor
        # cached) when the file changed while they were read
        self.check()
        return out

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def _header_digest(fd: int) -> str:
    return hashlib.blake2b(os.pread(fd, HEADER_BYTES, 0), digest_size=16).hexdigest()
