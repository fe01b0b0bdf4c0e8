"""Reading the host's memory figures from Linux: ``/proc/meminfo``, PSI and the cgroup.

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
``/proc/self/cgroup``, ``/proc/self/mountinfo`` and the cgroup's directory
    The process's cgroup holding the memory controller, found where ``mountinfo`` says its
    hierarchy is mounted (a container sees its own cgroup at the mount point; mountinfo's
    root field says which part of the hierarchy that is). Without ``mountinfo``: cgroup2 at
    ``/sys/fs/cgroup``, v1 at ``/sys/fs/cgroup/memory``.

    cgroup v2 (a ``0::<path>`` line and no v1 hierarchy holding ``memory``): the lowest
    ``memory.max`` from the process's cgroup up to the mount's root ("max": no limit), and
    that cgroup's ``memory.current``, ``memory.stat`` ``inactive_file`` and
    ``memory.pressure``. cgroup v1 (a ``N:memory:<path>`` line; also hybrid hosts): the
    lowest ``memory.limit_in_bytes`` (v1 writes "no limit" as a number near 2**63),
    ``memory.usage_in_bytes``, ``memory.stat`` ``total_inactive_file``, and PSI from the
    unified hierarchy when it is mounted. No cgroup at all: the cgroup figures are ``None``
    and ``source`` says why.

Errors: :class:`broker.core.host.HostMemoryError` naming the file, when a file that must be
there cannot be read (``/proc/meminfo``; the process's cgroup directory once its hierarchy is
mounted) or when any file read does not parse. A figure the kernel does not offer is ``None``,
never a guess.
"""

from __future__ import annotations

import errno
import re
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


def _number(files: _Files, rel: str, *, no_limit: str | None = None) -> int | None:
    """An integer file of the cgroup (``None``: absent, or the ``no_limit`` value)."""
    text = files.text(rel, optional=True)
    if text is None:
        return None
    value = text.strip()
    if no_limit is not None and value == no_limit:
        return None
    if not value.isdigit():
        raise HostMemoryError(f"{files.shown(rel)}: not a number: {value[:40]!r}", files.shown(rel))
    return int(value)


def _stat(files: _Files, rel: str, name: str) -> int | None:
    """One figure of a ``memory.stat`` (``None``: absent)."""
    text = files.text(rel, optional=True)
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            if not value.strip().isdigit():
                raise HostMemoryError(
                    f"{files.shown(rel)}: cannot parse {line!r}", files.shown(rel)
                )
            return int(value)
    return None


def _read_psi(files: _Files, rel: str) -> Psi | None:
    text = files.text(rel, optional=True)
    return None if text is None else _psi(text, files.shown(rel))


# cgroup v1 writes its "no limit" as the largest page-aligned counter, not as "max"
_V1_NO_LIMIT = 1 << 62


@dataclass(frozen=True, slots=True)
class _Mount:
    """A cgroup hierarchy's mount: ``root``, the hierarchy path at the mount point (not "/"
    in a container that sees only its own cgroup), and ``point``, where it is mounted."""

    root: str
    point: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in octal (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(files: _Files) -> tuple[_Mount | None, _Mount | None]:
    """(the cgroup2 mount, the cgroup v1 mount holding ``memory``), from
    ``/proc/self/mountinfo``; without it, the usual places (``/sys/fs/cgroup`` for cgroup2
    when it holds ``cgroup.controllers``, ``/sys/fs/cgroup/memory`` for v1)."""
    text = files.text("proc/self/mountinfo", optional=True)
    if text is None:
        v2 = files.path(f"{CGROUP_MOUNT}/cgroup.controllers").is_file()
        v1 = files.path(f"{CGROUP_MOUNT}/memory/memory.limit_in_bytes").is_file()
        return (
            _Mount("/", "/" + CGROUP_MOUNT) if v2 else None,
            _Mount("/", f"/{CGROUP_MOUNT}/memory") if v1 else None,
        )
    v2_mount: _Mount | None = None
    v1_mount: _Mount | None = None
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 4:
            raise HostMemoryError(
                f"/proc/self/mountinfo: cannot parse {line[:80]!r}", "/proc/self/mountinfo"
            )
        fstype, superopts = fields[sep + 1], fields[sep + 3]
        mount = _Mount(_unescape(fields[3]), _unescape(fields[4]))
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mount
        elif fstype == "cgroup" and "memory" in superopts.split(",") and v1_mount is None:
            v1_mount = mount
    return v2_mount, v1_mount


def _memberships(files: _Files) -> tuple[str | None, str | None]:
    """(the process's cgroup v2 path, its cgroup v1 ``memory`` path) from /proc/self/cgroup."""
    text = files.text("proc/self/cgroup", optional=True)
    if text is None:
        files.notes.append("no /proc/self/cgroup")
        return None, None
    v2: str | None = None
    v1: str | None = None
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
            v1 = path
    return v2, v1


def _levels(files: _Files, path: str, mount: _Mount) -> list[tuple[str, str]]:
    """(hierarchy path, directory under ``root``) of the process's cgroup and each parent up
    to the mount's root, the process's own first."""
    parts = [p for p in path.split("/") if p]
    top = [p for p in mount.root.split("/") if p]
    if ".." in parts or parts[: len(top)] != top:
        # outside the cgroup namespace, or a mount of another part of the hierarchy
        raise HostMemoryError(
            f"/proc/self/cgroup: the cgroup {path!r} is not under the cgroup mount "
            f"{mount.point} (its root is {mount.root!r})",
            "/proc/self/cgroup",
        )
    levels = []
    for depth in range(len(parts), len(top) - 1, -1):
        rel = "/".join([mount.point.strip("/"), *parts[len(top) : depth]])
        levels.append(("/" + "/".join(parts[:depth]), rel))
    if not files.path(levels[0][1]).is_dir():
        raise HostMemoryError(
            f"cannot find the cgroup directory /{levels[0][1]}", f"/{levels[0][1]}"
        )
    return levels


@dataclass(frozen=True, slots=True)
class _Cgroup:
    version: int | None = None
    path: str | None = None
    limit_path: str | None = None
    limit: int | None = None
    current: int | None = None
    inactive_file: int | None = None
    psi: Psi | None = None


def _read_cgroup(files: _Files) -> _Cgroup:
    v2_path, v1_path = _memberships(files)
    if v2_path is None and v1_path is None:
        return _Cgroup()
    v2_mount, v1_mount = _mounts(files)
    if v1_path is not None:
        # the memory controller is on cgroup v1 (a v1 or hybrid host)
        if v1_mount is None:
            files.notes.append("cgroup v1 memory controller not mounted")
            return _Cgroup()
        version, levels = 1, _levels(files, v1_path, v1_mount)
        limit_file, current_file, inactive = (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    else:
        assert v2_path is not None
        if v2_mount is None:
            files.notes.append("cgroup v2 not mounted")
            return _Cgroup()
        version, levels = 2, _levels(files, v2_path, v2_mount)
        limit_file, current_file, inactive = "memory.max", "memory.current", "inactive_file"
    # the limit in force is the lowest from the process's cgroup up to the mount's root
    limit: int | None = None
    limit_at = 0
    for i, (_, rel) in enumerate(levels):
        value = _number(files, f"{rel}/{limit_file}", no_limit="max" if version == 2 else None)
        if value is not None and value >= _V1_NO_LIMIT:
            value = None
        if value is not None and (limit is None or value < limit):
            limit, limit_at = value, i
    where = levels[limit_at][1]
    psi: Psi | None = None
    if version == 2:
        psi = _read_psi(files, f"{where}/memory.pressure")
    elif v2_path is not None and v2_mount is not None:
        # hybrid: PSI lives in the unified hierarchy, at the process's v2 cgroup (when that
        # cgroup is visible there; PSI is optional, the limit is what matters)
        try:
            unified = _levels(files, v2_path, v2_mount)[0][1]
        except HostMemoryError as exc:
            files.notes.append(f"no cgroup PSI ({exc})")
        else:
            psi = _read_psi(files, f"{unified}/memory.pressure")
    return _Cgroup(
        version=version,
        path=levels[0][0],
        limit_path=None if limit is None else levels[limit_at][0],
        limit=limit,
        current=_number(files, f"{where}/{current_file}"),
        inactive_file=_stat(files, f"{where}/memory.stat", inactive),
        psi=psi,
    )


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
        cgroup_version=cgroup.version,
        cgroup_path=cgroup.path,
        cgroup_limit_path=cgroup.limit_path,
        cgroup_limit_bytes=cgroup.limit,
        cgroup_current_bytes=cgroup.current,
        cgroup_inactive_file_bytes=cgroup.inactive_file,
        cgroup_psi=cgroup.psi,
        source=source,
    )
