"""Suite-wide options: ``--skip-slow`` leaves out the real-VM and soak tests locally."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skip-slow",
        action="store_true",
        default=False,
        help="skip tests marked slow (real VMs, soak); CI runs them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--skip-slow"):
        return
    skip = pytest.mark.skip(reason="slow test skipped with --skip-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
