"""Broker metadata in SQL: guests, pools, shared-pool authorisations, notices, settings.

Page bytes never go here (they live in the core's store and the journal). ``models`` holds the
tables, ``engine`` builds engines and runs migrations, ``repo`` is the only code that queries.
"""
