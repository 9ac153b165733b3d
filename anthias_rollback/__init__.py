"""anthias_rollback: reversible SQLite <-> PostgreSQL moves for Django."""

__version__ = '0.1.0'
