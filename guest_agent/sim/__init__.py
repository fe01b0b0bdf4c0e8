"""Simulated guests with real page contents and workloads (``tmem-agent simulate``).

:mod:`.images` (OS image trees), :mod:`.workloads` (access streams), :mod:`.model` (a guest's
RAM, anonymous memory and page cache), :mod:`.backends` (the in-memory twin),
:mod:`.agent` (the real agent shims against a broker), :mod:`.runner` (lock-step runs),
:mod:`.report` and :mod:`.plot` (output), :mod:`.cli` (the command).
"""

from __future__ import annotations
