"""Real NBD clients (qemu-io, nbdinfo, nbdcopy, fio) against ``tmem-agent nbd`` backed by a real
``tmem-broker serve`` process."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, fio_json, new_guest, persistent_pages, run

pytestmark = [
    pytest.mark.timeout(170),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-io", "nbdinfo", "nbdcopy", "fio")),
        reason="needs qemu-utils, libnbd-bin and fio (scripts/system-deps.sh)",
    ),
]


@dataclass
class Export:
    agent: NbdAgent
    broker: BrokerProcess
    guest_id: int

    def broker_pages(self) -> int:
        return persistent_pages(self.broker, self.guest_id)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("nbd-broker") / "data") as proc:
        yield proc


@pytest.fixture
def export(
    broker: BrokerProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Export]:
    guest_id, token = new_guest(broker, f"nbd-{request.node.name}"[:60])
    with NbdAgent.for_broker(broker, token, tmp_path, size="64MiB") as agent:
        yield Export(agent, broker, guest_id)


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    out = run(args).stdout
    assert "fail" not in out.lower(), out
    return out


def test_nbdinfo_lists_the_export(export: Export) -> None:
    listing = run(["nbdinfo", "--list", export.agent.uri]).stdout
    assert 'export="tmem"' in listing
    info = run(["nbdinfo", "--json", export.agent.uri]).stdout
    assert re.search(r'"export-size":\s*67108864', info), info
    assert re.search(r'"block_size_maximum":\s*33554432', info), info
    assert re.search(r'"can_flush":\s*true', info), info


def test_qemu_io_patterns_aligned_and_unaligned(export: Export) -> None:
    uri = export.agent.uri
    qemu_io(
        uri,
        "write -P 0x11 0 1M",  # aligned, 256 blocks in one request
        "write -P 0x22 4096 4096",
        "write -P 0x33 5000 10000",  # unaligned: read-modify-write at both ends
        "write -P 0x44 67108863 1",  # last byte of the export
        "flush",
    )
    out = qemu_io(
        uri,
        "read -P 0x11 0 4096",
        "read -P 0x22 4096 904",
        "read -P 0x33 5000 10000",
        "read -P 0x11 15000 1033576",
        "read -P 0x44 67108863 1",
        "read -P 0 1M 1M",  # never written: zeros
    )
    assert out.count("read ") == 6
    qemu_io(uri, "discard 0 64k", "read -P 0 0 64k", "write -z 128k 8k", "read -P 0 128k 8k")
    assert export.broker_pages() > 0


def test_nbdcopy_round_trips_a_random_image(export: Export, tmp_path: Path) -> None:
    image = tmp_path / "in.img"
    with image.open("wb") as f:
        f.write(random_bytes(64 * 1024 * 1024))
    run(["nbdcopy", str(image), export.agent.uri])
    out = tmp_path / "out.img"
    run(["nbdcopy", export.agent.uri, str(out)])
    assert sha256(out) == sha256(image)
    assert export.broker_pages() >= 16384 - 16  # the whole image sits at the broker


def test_fio_random_read_write_with_verify(export: Export) -> None:
    report = fio_json(
        export.agent.uri,
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=32",
        "--size=32m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
    )
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0
    assert export.broker_pages() > 0


def random_bytes(n: int) -> bytes:
    # fast, reproducible and incompressible enough: a hash chain, not os.urandom per test
    seed = hashlib.sha256(b"nbd-e2e").digest()
    block = hashlib.shake_256(seed).digest(1 << 20)
    return b"".join(
        hashlib.shake_256(block[:64] + i.to_bytes(4, "big")).digest(1 << 20) for i in range(n >> 20)
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_unix_socket_and_tcp_serve_one_export(broker: BrokerProcess, tmp_path: Path) -> None:
    _, token = new_guest(broker, "nbd-unix")
    sock = tmp_path / "nbd.sock"
    with NbdAgent.for_broker(broker, token, tmp_path, extra=("--unix", str(sock))) as agent:
        unix_uri = f"nbd+unix:///?socket={sock}"
        qemu_io(unix_uri, "write -P 0x7e 1M 12345", "flush")
        out = qemu_io(agent.uri, "read -P 0x7e 1M 12345")
        assert "read 12345/12345" in out
        assert 'export="tmem"' in run(["nbdinfo", "--list", unix_uri]).stdout
