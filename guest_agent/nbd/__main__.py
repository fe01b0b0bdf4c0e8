"""``python -m guest_agent.nbd ...``: the ``tmem-agent nbd`` command on its own."""

from __future__ import annotations

from guest_agent.nbd.cli import main

main()
