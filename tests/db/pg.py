"""The tests' name for :mod:`scripts.pgdb` (a throw-away PostgreSQL database), shared with
the demo and the benchmarks."""

from scripts.pgdb import SERVER, temp_database

__all__ = ["SERVER", "temp_database"]
