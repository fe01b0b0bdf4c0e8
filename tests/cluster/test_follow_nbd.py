"""A real ``tmem-agent nbd`` export given the broker that is NOT its guest's home (two broker
processes in cluster mode, the session's Redis Cluster, a fresh PostgreSQL database): qemu-io
writes and reads back through the redirect; after an admin move of the guest's home the same
export reads every byte back, and writes and reads at the new home. The agent's fallback file
stays empty: every block went to the brokers, none was declined on the way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cluster.brokers import ClusterBrokers
from tests.e2e.nbd_support import NbdAgent, run

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils (system-deps.sh)"),
]


def _qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    out = run(args).stdout
    assert "Pattern verification failed" not in out, out
    return out


def test_nbd_export_follows_the_home(tmp_path: Path, two_brokers: ClusterBrokers) -> None:
    brokers = two_brokers
    gid, token, home, other = brokers.guest_away("vm-nbd")
    home_id, other_id = brokers.id_of(home), brokers.id_of(other)
    agent_tmp = tmp_path / "agent"
    agent_tmp.mkdir()
    with NbdAgent.for_broker(other, token, agent_tmp, size="64MiB") as agent:
        uri = agent.uri
        _qemu_io(
            uri,
            "write -P 0x5a 0 1M",
            "write -P 0xa5 8M 256k",
            "write -P 0x3c 3000 5000",  # unaligned: read-modify-write through the broker
        )
        expected = (
            "read -P 0x5a 0 3000",
            "read -P 0x3c 3000 5000",
            "read -P 0x5a 8000 1040576",
            "read -P 0xa5 8M 256k",
            "read -P 0x00 1M 7M",  # never written: zeros
        )
        _qemu_io(uri, *expected)

        # the guest moves to the broker the export was given: the next reads follow
        moved = other.json("POST", f"/v1/guests/{gid}/home", {"broker": other_id})
        assert moved["home_broker"] == other_id
        _qemu_io(uri, *expected)
        _qemu_io(uri, "write -P 0x77 16M 512k", "read -P 0x77 16M 512k", *expected)

        # and back to the first home (the export now talks to other: a 307 again)
        back = home.json("POST", f"/v1/guests/{gid}/home", {"broker": home_id})
        assert back["home_broker"] == home_id
        _qemu_io(uri, "read -P 0x77 16M 512k", *expected)
    fallback = agent_tmp / "fallback.img"
    assert not fallback.exists() or fallback.stat().st_blocks == 0
    # (The home is not asserted again here: on a loaded machine a 1.5 s lease may lapse
    # and pass to the other broker, which is takeover working, not a fault.)
