"""Reading the host's memory figures from Linux: ``/proc/meminfo``, PSI and the cgroup v2.

::

    from broker.hostmem import read_host_memory

    host = read_host_memory()          # a broker.core.host.HostMemory
    host.limit_bytes, host.available_bytes, host.psi_some_avg10, host.source

``root`` (default ``/``) is where the files are looked up, so that tests feed recorded files
from a directory of their own (``tests/data/host/<case>/proc/meminfo``, ...). What is read:

``/proc/meminfo``
    ``MemTotal`` (required), ``MemAvailable``, ``SwapTotal``, ``SwapFree`` (kB, as bytes).
``/proc/pressure/memory``
    PSI ``some``/``full`` ``avg10``/``avg60``/``avg300`` (percent) and ``total`` (µs).
    Missing (a kernel without ``CONFIG_PSI``, or booted with ``psi=0``): ``psi`` is ``None``.
``/proc/self/cgroup`` and ``/sys/fs/cgroup/<path>/``
    With the memory controller on cgroup v2 (a ``0::<path>`` line, no v1 hierarchy holding
    ``memory``, and a cgroup2 mount at ``/sys/fs/cgroup``): the lowest ``memory.max`` from
    the process's cgroup up to the mount's root ("max" means no limit), and that cgroup's
    ``memory.current``, ``memory.stat`` ``inactive_file`` and ``memory.pressure``. On
    cgroup v1, a hybrid mount or no cgroup at all the cgroup figures are ``None`` and
    ``source`` says why.

Errors: :class:`broker.core.host.HostMemoryError` naming the file, when a file that must be
there cannot be read (``/proc/meminfo``; the process's cgroup directory once cgroup v2 is
mounted) or when any file read does not parse. A figure the kernel does not offer is ``None``,
never a guess.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from broker.core.host import HostMemory, HostMemoryError, Psi

__all__ = ["HostMemoryError", "read_host_memory", "read_meminfo", "read_psi"]

_MEMINFO_FIELDS = ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")
CGROUP_MOUNT = "sys/fs/cgroup"


class _Files:
    """Reads files under ``root``, names them as the host would, and remembers what it read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.read: list[str] = []
        self.notes: list[str] = []

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @staticmethod
    def shown(rel: str) -> str:
        return "/" + rel.lstrip("/")

    def text(self, rel: str, *, optional: bool = False) -> str | None:
        """The file's text; ``None`` when ``optional`` and the kernel does not offer it."""
        try:
            text = self.path(rel).read_text()
        except OSError as exc:
            absent = exc.errno in (errno.ENOENT, errno.EOPNOTSUPP)
            if optional and absent:
                return None
            raise HostMemoryError(
                f"cannot read {self.shown(rel)}: {exc.strerror or exc}", self.shown(rel)
            ) from exc
        self.read.append(self.shown(rel))
        return text


def _meminfo(text: str, shown: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if name not in _MEMINFO_FIELDS:
            continue
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit() or parts[1:] not in ([], ["kB"]):
            raise HostMemoryError(f"{shown}: cannot parse {line.strip()!r}", shown)
        out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if out.get("MemTotal", 0) <= 0:
        raise HostMemoryError(f"{shown}: no MemTotal (or it is 0)", shown)
    return out


def read_meminfo(root: str | Path = "/") -> dict[str, int]:
    """``MemTotal``, ``MemAvailable``, ``SwapTotal`` and ``SwapFree`` in bytes (the ones the
    kernel writes; ``MemTotal`` always)."""
    files = _Files(root)
    text = files.text("proc/meminfo")
    assert text is not None
    return _meminfo(text, "/proc/meminfo")


def _psi(text: str, shown: str) -> Psi:
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, _, rest = line.partition(" ")
        items = dict(item.partition("=")[::2] for item in rest.split())
        if kind not in ("some", "full") or kind in lines:
            raise HostMemoryError(f"{shown}: cannot parse {line.strip()!r}", shown)
        lines[kind] = items
    if "some" not in lines:
        raise HostMemoryError(f"{shown}: no 'some' line", shown)

    def record(kind: str) -> tuple[float, float, float, int]:
        items = lines[kind]
        try:
            avgs = tuple(float(items[k]) for k in ("avg10", "avg60", "avg300"))
            total = int(items["total"])
        except (KeyError, ValueError) as exc:
            raise HostMemoryError(f"{shown}: cannot parse the {kind!r} line", shown) from exc
        if not all(0.0 <= a <= 100.0 for a in avgs) or total < 0:
            raise HostMemoryError(f"{shown}: the {kind!r} line is out of range", shown)
        return avgs[0], avgs[1], avgs[2], total

    some = record("some")
    if "full" not in lines:
        return Psi(*some)
    return Psi(*some, *record("full"))


def read_psi(root: str | Path = "/", rel: str = "proc/pressure/memory") -> Psi | None:
    """One PSI file under ``root`` (default the system's memory pressure); ``None`` when the
    kernel does not offer it."""
    return _read_psi(_Files(root), rel)


def _number(files: _Files, rel: str, *, allow_max: bool = False) -> int | None:
    """An integer file of the cgroup (``None``: absent; ``max`` when allowed: no limit)."""
    text = files.text(rel, optional=True)
    if text is None:
        return None
    value = text.strip()
    if allow_max and value == "max":
        return None
    if not value.isdigit():
        raise HostMemoryError(f"{files.shown(rel)}: not a number: {value[:40]!r}", files.shown(rel))
    return int(value)


def _inactive_file(files: _Files, rel: str) -> int | None:
    text = files.text(rel, optional=True)
    if text is None:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "inactive_file":
            if not value.strip().isdigit():
                raise HostMemoryError(
                    f"{files.shown(rel)}: cannot parse {line!r}", files.shown(rel)
                )
            return int(value)
    return None


def _cgroup_v2_path(files: _Files) -> str | None:
    """The process's cgroup v2 path when the memory controller is on a cgroup2 mount at
    ``/sys/fs/cgroup``; ``None`` (with a note) otherwise."""
    text = files.text("proc/self/cgroup", optional=True)
    if text is None:
        files.notes.append("no /proc/self/cgroup")
        return None
    v2: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            raise HostMemoryError(f"/proc/self/cgroup: cannot parse {line!r}", "/proc/self/cgroup")
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            files.notes.append("cgroup v1 memory controller (its limit is not read)")
            return None
    if v2 is None:
        files.notes.append("no cgroup v2")
        return None
    if not files.path(f"{CGROUP_MOUNT}/cgroup.controllers").is_file():
        files.notes.append("cgroup v2 not mounted at /sys/fs/cgroup")
        return None
    return v2


@dataclass(frozen=True, slots=True)
class _Cgroup:
    path: str | None = None
    limit_path: str | None = None
    limit: int | None = None
    current: int | None = None
    inactive_file: int | None = None
    psi: Psi | None = None


def _read_cgroup(files: _Files) -> _Cgroup:
    path = _cgroup_v2_path(files)
    if path is None:
        return _Cgroup()
    parts = [p for p in path.split("/") if p]
    if ".." in parts:
        # the process sits outside its cgroup namespace's root: its cgroup is not visible
        raise HostMemoryError(
            f"/proc/self/cgroup: the cgroup {path!r} is outside this cgroup namespace",
            "/proc/self/cgroup",
        )
    leaf = "/".join([CGROUP_MOUNT, *parts])
    if not files.path(leaf).is_dir():
        raise HostMemoryError(f"cannot find the cgroup directory /{leaf}", f"/{leaf}")
    # the limit in force is the lowest memory.max from the process's cgroup up to the root
    limit: int | None = None
    limit_dir = leaf
    for depth in range(len(parts), -1, -1):
        here = "/".join([CGROUP_MOUNT, *parts[:depth]])
        value = _number(files, f"{here}/memory.max", allow_max=True)
        if value is not None and (limit is None or value < limit):
            limit, limit_dir = value, here
    return _Cgroup(
        path="/" + "/".join(parts),
        limit_path=None if limit is None else "/" + limit_dir[len(CGROUP_MOUNT) :].lstrip("/"),
        limit=limit,
        current=_number(files, f"{limit_dir}/memory.current"),
        inactive_file=_inactive_file(files, f"{limit_dir}/memory.stat"),
        psi=_read_psi(files, f"{limit_dir}/memory.pressure"),
    )


def _read_psi(files: _Files, rel: str) -> Psi | None:
    text = files.text(rel, optional=True)
    return None if text is None else _psi(text, files.shown(rel))


def read_host_memory(root: str | Path = "/") -> HostMemory:
    """Every figure of :class:`broker.core.host.HostMemory`, read now from ``root``.

    Raises :class:`broker.core.host.HostMemoryError` naming the file that could not be read
    or parsed (see the module docstring for which files must be there)."""
    files = _Files(root)
    meminfo_text = files.text("proc/meminfo")
    assert meminfo_text is not None
    mem = _meminfo(meminfo_text, "/proc/meminfo")
    psi = _read_psi(files, "proc/pressure/memory")
    cgroup = _read_cgroup(files)
    source = ", ".join(files.read + files.notes)
    return HostMemory(
        mem_total_bytes=mem["MemTotal"],
        mem_available_bytes=mem.get("MemAvailable"),
        swap_total_bytes=mem.get("SwapTotal"),
        swap_free_bytes=mem.get("SwapFree"),
        psi=psi,
        cgroup_path=cgroup.path,
        cgroup_limit_path=cgroup.limit_path,
        cgroup_limit_bytes=cgroup.limit,
        cgroup_current_bytes=cgroup.current,
        cgroup_inactive_file_bytes=cgroup.inactive_file,
        cgroup_psi=cgroup.psi,
        source=source,
    )
