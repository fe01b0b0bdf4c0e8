"""Fixtures of the simulator tests: a small image of real files copied from /usr/lib, so the
page contents are real but cannot change under a test (a package upgrade elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .expected import copy_image


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_image(tmp_path_factory.mktemp("image"))
