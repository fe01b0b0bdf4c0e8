"""The host readers (broker/hostmem.py) on recorded /proc and cgroup files (tests/data/host/),
on this machine's real files, and the measured claim of issue #16 item 1: fed the recorded
files of a host running short, the broker's effective capacity falls and its first shed goes
out within two pressure intervals."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from broker.core import CoreConfig, Tmem
from broker.core.host import (
    REASON_AVAILABLE,
    REASON_CGROUP,
    REASON_PSI,
    HostGovernor,
    HostMemoryError,
    Psi,
    auto_capacity,
)
from broker.core.pressure import PressurePolicy, PressureSettings
from broker.hostmem import read_host_memory, read_meminfo, read_psi
from schemas.batch import STATUS_DONE

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).resolve().parent.parent / "data" / "host"
PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30


def case(name: str) -> Path:
    return DATA / name


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


MEMINFO = "MemTotal:        8388608 kB\nMemFree:         1000000 kB\nMemAvailable:    4194304 kB\n"


# -- recorded hosts --------------------------------------------------------------------------


def test_a_host_at_95_percent() -> None:
    host = read_host_memory(case("host_95"))
    assert host.mem_total_bytes == 16 * GiB
    assert host.mem_available_bytes == 838860 * 1024  # 5 %, rounded down to the kB
    assert host.swap_total_bytes == 4 * GiB and host.swap_free_bytes == 3 * GiB
    assert host.used_percent == pytest.approx(95.0, abs=0.01)
    assert host.psi == Psi(4.12, 2.05, 0.80, 412337901, 1.02, 0.51, 0.20, 98233411)
    # a systemd service without a limit: "max" at every level
    assert host.cgroup_version == 2 and host.cgroup_path == "/system.slice/tmem-broker.service"
    assert host.cgroup_limit_bytes is None and host.cgroup_limit_path is None
    assert host.limited_by == "host"
    assert host.cgroup_current_bytes == 3 * GiB and host.cgroup_inactive_file_bytes == 200 * MiB
    assert host.cgroup_psi is not None and host.cgroup_psi.some_avg10 == 0.0
    assert host.source.split(", ")[:3] == [
        "/proc/meminfo",
        "/proc/pressure/memory",
        "/proc/self/cgroup",
    ]
    assert "/sys/fs/cgroup/system.slice/memory.max" in host.source


def test_a_psi_spike() -> None:
    host = read_host_memory(case("psi_spike"))
    assert host.psi is not None and host.psi.some_avg10 == 38.5 and host.psi.full_avg10 == 12.0
    assert host.psi.some_total_us == 9812377411
    assert host.psi_some_avg10 == 38.5 and host.used_percent == pytest.approx(60.0, abs=0.01)


def test_a_container_at_its_cgroup_limit() -> None:
    host = read_host_memory(case("cgroup_limit"))
    assert host.cgroup_path == "/" and host.cgroup_limit_path == "/"  # a cgroup namespace
    assert host.cgroup_limit_bytes == 2 * GiB and host.limited_by == "cgroup"
    assert host.limit_bytes == 2 * GiB  # not the 64 GiB of MemTotal
    assert host.cgroup_current_bytes == 2 * GiB - 4 * MiB
    assert host.cgroup_inactive_file_bytes == 12 * MiB
    assert host.available_bytes == 16 * MiB  # the cgroup's room, not the host's 32 GiB
    assert host.cgroup_psi is not None and host.cgroup_psi.some_avg10 == 22.0
    assert auto_capacity(host) == 2 * GiB - 512 * MiB


def test_the_limit_of_a_parent_cgroup_counts() -> None:
    host = read_host_memory(case("cgroup_parent_limit"))
    assert host.cgroup_path == "/machine.slice/tmem-broker.scope"
    assert host.cgroup_limit_path == "/machine.slice" and host.cgroup_limit_bytes == 8 * GiB
    # the slice's own figures, not the scope's
    assert host.cgroup_current_bytes == 3 * GiB and host.cgroup_inactive_file_bytes == 500 * MiB
    assert host.available_bytes == 8 * GiB - (3 * GiB - 500 * MiB)


def test_no_cgroup_gives_no_cgroup_figures() -> None:
    host = read_host_memory(case("no_cgroup"))
    assert host.cgroup_version is None and host.cgroup_path is None
    assert host.cgroup_limit_bytes is None and host.cgroup_current_bytes is None
    assert host.cgroup_psi is None
    assert host.limited_by == "host" and host.source.endswith("no /proc/self/cgroup")


def test_cgroup_v1_on_a_hybrid_host_recorded_on_the_build_machine() -> None:
    """Recorded from this project's build machine: the memory controller on cgroup v1, a
    cgroup2 hierarchy at /sys/fs/cgroup/unified holding only PSI, no limit (v1 writes "no
    limit" as 9223372036854771712)."""
    root = case("cgroup_v1")
    leaf = "/process_api/77e35d6781b540ef00198b7e719eb889"
    host = read_host_memory(root)
    assert host.cgroup_version == 1 and host.cgroup_path == leaf
    assert host.cgroup_limit_bytes is None and host.cgroup_limit_path is None
    usage = root / f"sys/fs/cgroup/memory{leaf}/memory.usage_in_bytes"
    assert host.cgroup_current_bytes == int(usage.read_text())
    assert host.cgroup_inactive_file_bytes is not None and host.cgroup_inactive_file_bytes > 0
    assert host.cgroup_psi is not None  # from the unified hierarchy
    assert "/sys/fs/cgroup/unified/memory.pressure" in host.source
    assert host.limited_by == "host" and host.available_bytes == host.mem_available_bytes


def test_a_cgroup_v1_container_at_its_limit() -> None:
    """Docker on a v1 host: /proc/self/cgroup names /docker/<id>, but the container sees its
    own cgroup at the mount point (mountinfo's root field says which part it is)."""
    host = read_host_memory(case("cgroup_v1_container"))
    assert host.cgroup_version == 1 and host.cgroup_path == "/docker/4f1c2d"
    assert host.cgroup_limit_bytes == GiB and host.cgroup_limit_path == "/docker/4f1c2d"
    assert "/sys/fs/cgroup/memory/memory.limit_in_bytes" in host.source
    assert host.cgroup_current_bytes == GiB - 40 * MiB
    assert host.cgroup_inactive_file_bytes == 20 * MiB
    assert host.available_bytes == 60 * MiB and host.limited_by == "cgroup"
    assert host.cgroup_psi is None  # v1 has no memory.pressure
    assert auto_capacity(host) == 512 * MiB


def test_no_psi_is_none_not_an_error() -> None:
    host = read_host_memory(case("no_cgroup"))  # a kernel without CONFIG_PSI
    assert host.psi is None and host.psi_some_avg10 is None
    assert read_psi(case("no_cgroup")) is None


@pytest.mark.parametrize(
    ("name", "path", "what"),
    [
        ("garbage_meminfo", "/proc/meminfo", "cannot parse 'MemTotal:       16GB'"),
        ("garbage_psi", "/proc/pressure/memory", "cannot parse the 'some' line"),
        ("garbage_memory_max", "/sys/fs/cgroup/tmem/memory.max", "not a number: 'unlimited'"),
        (
            "missing_cgroup_dir",
            "/sys/fs/cgroup/kubepods/pod1234/abcd",
            "cannot find the cgroup directory",
        ),
    ],
)
def test_garbage_is_a_clear_error_naming_the_file(name: str, path: str, what: str) -> None:
    with pytest.raises(HostMemoryError) as info:
        read_host_memory(case(name))
    assert info.value.path == path
    assert path in str(info.value) and what in str(info.value)


# -- more bad input, written on the spot -----------------------------------------------------


def test_no_proc_at_all_names_meminfo(tmp_path: Path) -> None:
    with pytest.raises(HostMemoryError, match=r"cannot read /proc/meminfo") as info:
        read_host_memory(tmp_path)
    assert info.value.path == "/proc/meminfo"


@pytest.mark.parametrize(
    "text",
    [
        "MemFree:  1000 kB\n",  # no MemTotal
        "MemTotal:        0 kB\n",
        "MemTotal:  1000 MB\n",  # a unit the kernel never writes
        "MemTotal:  -5 kB\n",
        "",
    ],
)
def test_meminfo_without_a_usable_memtotal_is_refused(tmp_path: Path, text: str) -> None:
    write(tmp_path, {"proc/meminfo": text})
    with pytest.raises(HostMemoryError, match="/proc/meminfo"):
        read_meminfo(tmp_path)


def test_meminfo_figures_are_bytes(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"proc/meminfo": MEMINFO + "SwapTotal:  0 kB\nSwapFree:  0 kB\nHugePages_Total:  0\n"},
    )
    assert read_meminfo(tmp_path) == {
        "MemTotal": 8 * GiB,
        "MemAvailable": 4 * GiB,
        "SwapTotal": 0,
        "SwapFree": 0,
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",  # no some line
        "some avg10=0.00 avg60=0.00 total=0\n",  # avg300 missing
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n",
        "some avg10=101.00 avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nsome avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        "many avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    ],
)
def test_psi_garbage_is_refused(tmp_path: Path, text: str) -> None:
    write(tmp_path, {"proc/meminfo": MEMINFO, "proc/pressure/memory": text})
    with pytest.raises(HostMemoryError) as info:
        read_host_memory(tmp_path)
    assert info.value.path == "/proc/pressure/memory"


def test_psi_without_a_full_line(tmp_path: Path) -> None:
    write(tmp_path, {"proc/pressure/memory": "some avg10=1.50 avg60=0.50 avg300=0.10 total=77\n"})
    assert read_psi(tmp_path) == Psi(1.5, 0.5, 0.1, 77)


def test_a_file_that_exists_but_cannot_be_read_is_an_error_even_if_optional(tmp_path: Path) -> None:
    write(tmp_path, {"proc/meminfo": MEMINFO})
    (tmp_path / "proc/pressure/memory").mkdir(parents=True)  # EISDIR, not "absent"
    with pytest.raises(HostMemoryError, match="cannot read /proc/pressure/memory"):
        read_host_memory(tmp_path)


@pytest.mark.parametrize(
    "text",
    ["0::/ok\nnot a cgroup line\n", "x::/\n"],
)
def test_proc_self_cgroup_garbage_is_refused(tmp_path: Path, text: str) -> None:
    write(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/cgroup": text})
    with pytest.raises(HostMemoryError) as info:
        read_host_memory(tmp_path)
    assert info.value.path == "/proc/self/cgroup"


def test_a_cgroup_outside_the_namespace_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/../../system.slice/x.service\n",
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
        },
    )
    with pytest.raises(HostMemoryError, match="is not under the cgroup mount"):
        read_host_memory(tmp_path)


def test_cgroup_v2_not_mounted_is_noted(tmp_path: Path) -> None:
    write(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/cgroup": "1:cpu:/\n0::/user.slice\n"})
    host = read_host_memory(tmp_path)
    assert host.cgroup_path is None and host.source.endswith("cgroup v2 not mounted")


def test_the_cgroup2_mount_is_found_through_mountinfo(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/svc\n",
            "proc/self/mountinfo": (
                "41 31 0:38 / /run/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n"
            ),
            "run/my cgroups/svc/memory.max": f"{GiB}\n",
            "run/my cgroups/svc/memory.current": f"{100 * MiB}\n",
        },
    )
    host = read_host_memory(tmp_path)
    assert host.cgroup_version == 2 and host.cgroup_limit_bytes == GiB
    assert "/run/my cgroups/svc/memory.max" in host.source


def test_mountinfo_garbage_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/\n",
            "proc/self/mountinfo": "41 31 - cgroup2\n",
        },
    )
    with pytest.raises(HostMemoryError) as info:
        read_host_memory(tmp_path)
    assert info.value.path == "/proc/self/mountinfo"


def test_the_lowest_memory_max_up_the_tree_wins(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/a/b/c\n",
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/a/memory.max": f"{4 * GiB}\n",
            "sys/fs/cgroup/a/b/memory.max": f"{1 * GiB}\n",
            "sys/fs/cgroup/a/b/memory.current": f"{512 * MiB}\n",
            "sys/fs/cgroup/a/b/c/memory.max": "max\n",
        },
    )
    host = read_host_memory(tmp_path)
    assert host.cgroup_limit_path == "/a/b" and host.cgroup_limit_bytes == GiB
    assert host.cgroup_current_bytes == 512 * MiB and host.cgroup_inactive_file_bytes is None
    assert host.available_bytes == 512 * MiB


# -- this machine ----------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_this_machines_real_files() -> None:
    host = read_host_memory()
    assert host.mem_total_bytes > 0
    assert host.mem_available_bytes is not None
    assert 0 <= host.mem_available_bytes <= host.mem_total_bytes
    assert host.source.startswith("/proc/meminfo")
    for psi in (host.psi, host.cgroup_psi):
        assert psi is None or (0.0 <= psi.some_avg10 <= 100.0 and psi.some_total_us >= 0)
    if Path("/proc/pressure/memory").exists():
        assert host.psi is not None
    if host.cgroup_limit_bytes is not None:
        assert host.cgroup_limit_bytes > 0 and host.cgroup_current_bytes is not None
    assert 0.0 <= (host.used_percent or 0.0) <= 100.0
    # the governor takes the live figures as they come
    gov = HostGovernor(GiB)
    assert gov.floor <= gov.observe(host, 0, now=0.0) <= GiB
    if host.limit_bytes > 2 * GiB:
        assert 0 < auto_capacity(host) < host.limit_bytes
    assert os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >= host.mem_total_bytes // 2


# -- the measured claim ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("short_case", "reason"),
    [
        ("host_95", REASON_AVAILABLE),
        ("psi_spike", REASON_PSI),
        ("cgroup_limit", REASON_CGROUP),
        ("cgroup_v1_container", REASON_CGROUP),
    ],
)
def test_a_host_running_short_shrinks_the_capacity_and_sheds_within_two_intervals(
    short_case: str, reason: str
) -> None:
    """Two guests hold 72 % of capacity in persistent pages and 20 % in ephemeral ones:
    nothing to do while the host is healthy. Once the recorded files show the host short,
    ephemeral pages are evicted first and the first shed is an intent of the same step."""
    base_pages = 1000
    tmem = Tmem(CoreConfig(capacity_bytes=base_pages * PAGE))
    for gid in (1, 2):
        tmem.add_guest(gid, name=f"g{gid}", weight=100)
        assert tmem.create_pool(gid, "persistent") == 0
        assert tmem.create_pool(gid, "ephemeral") == 1
        for i in range(360):
            assert tmem.put(gid, 0, 1, i, os.urandom(PAGE)) == STATUS_DONE
        for i in range(100):
            assert tmem.put(gid, 1, 1, i, os.urandom(PAGE)) == STATUS_DONE
    policy = PressurePolicy(tmem, PressureSettings(), now=0.0)
    governor = HostGovernor(tmem.capacity_bytes)
    interval = 1.0

    def step(name: str, now: float) -> list[str]:
        host = read_host_memory(case(name))
        tmem.capacity_bytes = governor.observe(host, tmem.counted_bytes, now)
        return [i.kind for i in policy.step(now, {})]

    for n in range(3):  # healthy: full capacity, no intents
        assert step("recovered", n * interval) == []
        assert tmem.capacity_bytes == base_pages * PAGE
    assert tmem.stats().ephemeral_pages == 200
    shed_at = None
    for n in range(1, 3):  # at most two intervals
        kinds = step(short_case, (2 + n) * interval)
        assert tmem.capacity_bytes < base_pages * PAGE  # fell at the first short reading
        if "shed" in kinds:
            shed_at = n
            break
    assert shed_at is not None and shed_at <= 2
    assert governor.last_reason == reason
    # ephemeral pages went first (the capacity setter or the step evicted them); persistent
    # pages stay, every one, and the guests are asked to shed what no longer fits
    figures = tmem.stats()
    assert figures.ephemeral_pages < 200 and figures.persistent_pages == 720
    assert policy.counters.sheds_issued == 2  # both guests are above their share
    assert math.floor(0.75 * tmem.capacity_bytes // PAGE) < 720
