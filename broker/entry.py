"""The ``tmem-broker`` script: runs :func:`broker.cli.main` once the server extra is installed.

A plain ``pip install tmem-broker`` is the guest's install (``tmem-agent``, ``TmemClient``); the
broker's own stack comes with ``pip install 'tmem-broker[server]'``. Without it this script
prints that command in one line on stderr and exits with status 2, instead of a traceback about
a missing module. It imports nothing outside the standard library until the check has passed.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["INSTALL_HINT", "SERVER_MODULES", "main", "missing_server_modules"]

SERVER_MODULES = (
    "fastapi",
    "uvicorn",
    "pydantic_settings",
    "xxhash",
    "lz4",
    "zstandard",
    "lmdb",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "prometheus_client",
)
"""Import names of the ``[server]`` extra's packages (pyproject.toml), in the same order."""

INSTALL_HINT = "pip install 'tmem-broker[server]'"


def missing_server_modules() -> list[str]:
    """The :data:`SERVER_MODULES` this interpreter cannot find, without importing any."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def main() -> None:
    """Entry point of the ``tmem-broker`` script."""
    missing = missing_server_modules()
    if missing:
        print(
            f"tmem-broker: the broker needs its server extra (missing: {', '.join(missing)});"
            f" install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from broker.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
