"""A second, independent PostgreSQL session on the test database: its
own libpq connection, outside Django, as another app process, a psql
session or another role would be."""
import psycopg2
from django.db import connections


def pg_session(user: str | None = None, password: str | None = None):
    """A psycopg2 connection to the `postgres` alias's (test) database,
    as *user* (default: the alias's own role)."""
    s = connections['postgres'].settings_dict
    return psycopg2.connect(
        dbname=s['NAME'], host=s['HOST'], port=s['PORT'] or None,
        user=user or s['USER'],
        password=password if user else s['PASSWORD'])
