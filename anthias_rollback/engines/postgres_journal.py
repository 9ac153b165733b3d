"""PostgreSQL: the change journal and the write fence, in the triggers.

From the cutover on, every journaled table carries one AFTER row trigger
(its own `anthias_rb_log_row_<hash>()`, which reads the key column
directly) and a statement trigger for TRUNCATE (`anthias_rb_log()`). Each:

1. it takes the fence lock shared (`pg_advisory_xact_lock_shared`), held
   to the end of the writing transaction;
2. it refuses the write if the fence is up. The flag is a SEQUENCE, read
   with `pg_sequence_last_value()`: sequences are not transactional, so a
   REPEATABLE READ transaction that began before the fence sees it too
   (a flag row would be invisible to its snapshot);
3. it appends (transaction id, table, operation, key) to the journal.

Taking the fence: raise the flag, then take the lock exclusively. That
waits exactly for the transactions that already wrote (they hold it
shared); any later write sees the flag and fails. The function is
SECURITY DEFINER, so it binds every role and every open session at once,
and needs no superuser: the tables' owner installs it.

Tables and functions live beside the app's tables, named `anthias_rb_*`,
outside Django's models (no model: nothing copies, compares or migrates
them, and ending the window drops them without a migration).
"""
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connections, models, transaction

JOURNAL = 'anthias_rb_journal'
CUTOVER = 'anthias_rb_cutover'
FENCE = 'anthias_rb_fence'          # the flag: a sequence, 1 open, 2 up
FUNCTION = 'anthias_rb_log'
TRIGGER = 'anthias_rb_journal'
# pg_advisory locks are per database; one fixed key ('anthias-rollback'
# folded into a bigint) for the fence.
FENCE_LOCK = 0x616e74686961735f
OPEN, UP = 1, 2
FENCE_MESSAGE = ('anthias_rollback: writes to this database are fenced: '
                 'the device was rolled back to SQLite. Restart this '
                 'process on the sqlite profile (or run switch_database '
                 '--to postgres to lift the fence)')

# Every journaled write: the fence lock shared to the end of its
# transaction, then the flag (a sequence: read outside MVCC).
# With the fence up, one session may still write: the copy that makes
# PostgreSQL equal to SQLite again before a new window (migrate_to_postgres
# --replace after a rollback; its transaction sets COPY_SETTING). Its rows
# are not journaled: the switch that follows opens a new window. The fence
# stops stale app processes, which never set it.
COPY_SETTING = 'anthias_rb.copy'
_FENCE_CHECK = f"""    PERFORM pg_advisory_xact_lock_shared({FENCE_LOCK});
    IF pg_sequence_last_value('{FENCE}'::regclass) = {UP} THEN
        IF current_setting('{COPY_SETTING}', true) = 'on' THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
            MESSAGE = '{FENCE_MESSAGE}';
    END IF;"""

_INSTALL_SQL = f"""
CREATE TABLE IF NOT EXISTS {JOURNAL} (
    id bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tbl text NOT NULL,
    op char(1) NOT NULL,
    pk text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- The standby's batches select by transaction id (txid >= the previous
-- tick's xmin), as PgQ's consumers do.
CREATE INDEX IF NOT EXISTS {JOURNAL}_txid ON {JOURNAL} (txid);
CREATE TABLE IF NOT EXISTS {CUTOVER} (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    snapshot pg_snapshot NOT NULL DEFAULT pg_current_snapshot(),
    forced boolean NOT NULL,
    info jsonb NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS {FENCE} MINVALUE 1 MAXVALUE 2 START 1;
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $f$
BEGIN
{_FENCE_CHECK}
    INSERT INTO {JOURNAL} (tbl, op) VALUES (TG_TABLE_NAME, 'T');
    RETURN NULL;
END
$f$;
"""

# One row function per table, reading its key columns directly: the
# generic `to_jsonb(NEW) ->> key` form made a 10,000-row UPDATE about 5x
# slower than without the journal (bench_journal; ~2.8x when direct).
# {old_key}/{new_key}: the key as the journal's text (key_sql);
# {old_row}/{new_row}: the key columns, compared to see a key change.
_ROW_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $f$
BEGIN
{fence}
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {journal} (tbl, op, pk)
        VALUES (TG_TABLE_NAME, 'I', {new_key});
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {journal} (tbl, op, pk)
        VALUES (TG_TABLE_NAME, 'D', {old_key});
    ELSIF {old_row} IS DISTINCT FROM {new_row} THEN
        -- A changed key is a delete of the old and an insert of the new.
        INSERT INTO {journal} (tbl, op, pk)
        VALUES (TG_TABLE_NAME, 'D', {old_key}),
               (TG_TABLE_NAME, 'I', {new_key});
    ELSE
        INSERT INTO {journal} (tbl, op, pk)
        VALUES (TG_TABLE_NAME, 'U', {new_key});
    END IF;
    RETURN NULL;
END
$f$;
"""


def key_sql(quoted: Sequence[str], row: str = '') -> str:
    """The journal's text for a row's key, from its (quoted) key columns,
    qualified by *row* ('NEW', 'OLD' or ''): one column, its text, as
    windows have always recorded it; a composite key (Django 5.2
    CompositePrimaryKey), the JSON array of its columns in key order
    (`["eu", 1]`): one text column, so the journal's format, DISTINCT and
    the standby's batches stay as they are."""
    prefix = f'{row}.' if row else ''
    if len(quoted) == 1:
        return f'{prefix}{quoted[0]}::text'
    inner = ', '.join(f'{prefix}{column}' for column in quoted)
    return f'jsonb_build_array({inner})::text'


def postgres_key_tuples_clause(quoted: Sequence[str],
                               db_types: Sequence[str],
                               keys: Sequence[tuple]) -> tuple[str, list]:
    """WHERE clause and parameters for rows whose composite key (the
    *quoted* columns, of *db_types*) is one of *keys*: one array per
    column, whatever their number; the key index serves it."""
    columns = ', '.join(quoted)
    arrays = ', '.join(f'%s::{db_type}[]' for db_type in db_types)
    params = [list(column) for column in zip(*keys)]
    return f'({columns}) IN (SELECT * FROM unnest({arrays}))', params


def _row_function_sql(name: str, quoted: Sequence[str]) -> str:
    """CREATE the row function *name* for a table keyed by *quoted*."""
    def row(prefix: str) -> str:
        if len(quoted) == 1:
            return f'{prefix}.{quoted[0]}'
        return 'ROW(' + ', '.join(f'{prefix}.{c}' for c in quoted) + ')'

    return _ROW_FUNCTION_SQL.format(
        name=name, fence=_FENCE_CHECK, journal=JOURNAL,
        new_key=key_sql(quoted, 'NEW'), old_key=key_sql(quoted, 'OLD'),
        old_row=row('OLD'), new_row=row('NEW'))


# Tables created while the window is open (an upgrade's `migrate`, run by
# any process and role) are journaled and fenced from the statement that
# creates them: an event trigger at ddl_command_end runs inside that
# statement's transaction and gives the new table the same triggers.
# Chosen over a hook in our own migrate path because it also covers a
# `migrate` run by another process (Anthias runs one at every container
# start) and any role. PostgreSQL: only a superuser may create an event
# trigger; without one, readiness names every planned table left bare.
WATCH = 'anthias_rb_watch'

_WATCH_SQL = """
CREATE OR REPLACE FUNCTION {watch}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $w$
DECLARE
    made record;
    tbl text;
    keys text[];
    fn text;
    new_cols text;
    old_cols text;
BEGIN
    FOR made IN SELECT objid FROM pg_event_trigger_ddl_commands()
            WHERE command_tag = 'CREATE TABLE' AND object_type = 'table'
    LOOP
        SELECT c.relname INTO tbl FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = made.objid AND n.nspname = {schema}
            AND c.relkind IN ('r', 'p');
        CONTINUE WHEN tbl IS NULL OR left(tbl, 11) = 'anthias_rb_';
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(num, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid
                AND a.attnum = k.num
            WHERE i.indrelid = made.objid AND i.indisprimary;
        EXECUTE format('CREATE TRIGGER {trigger}_t AFTER TRUNCATE ON %I.%I '
            'FOR EACH STATEMENT EXECUTE FUNCTION {function}()', {schema}, tbl);
        -- Rows are journaled by their key (key_sql: a composite key as
        -- the JSON array of its columns). Without a primary key a write
        -- is fenced and journaled as the whole table changing ('T'):
        -- the standby and the incremental build re-read it.
        IF coalesce(array_length(keys, 1), 0) = 0 THEN
            EXECUTE format('CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE '
                'OR DELETE ON %I.%I FOR EACH STATEMENT EXECUTE FUNCTION '
                '{function}()', {schema}, tbl);
            CONTINUE;
        END IF;
        fn := '{function}_row_' || left(md5(tbl), 12);
        IF array_length(keys, 1) = 1 THEN
            EXECUTE format({row_function}, fn, format('NEW.%I::text',
                keys[1]), format('OLD.%I::text', keys[1]),
                format('OLD.%I', keys[1]), format('NEW.%I', keys[1]));
        ELSE
            SELECT string_agg(format('NEW.%I', k), ', ' ORDER BY o),
                   string_agg(format('OLD.%I', k), ', ' ORDER BY o)
                INTO new_cols, old_cols
                FROM unnest(keys) WITH ORDINALITY AS u(k, o);
            EXECUTE format({row_function}, fn,
                'jsonb_build_array(' || new_cols || ')::text',
                'jsonb_build_array(' || old_cols || ')::text',
                'ROW(' || old_cols || ')', 'ROW(' || new_cols || ')');
        END IF;
        EXECUTE format('CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR '
            'DELETE ON %I.%I FOR EACH ROW EXECUTE FUNCTION %I()',
            {schema}, tbl, fn);
    END LOOP;
END
$w$;
DROP EVENT TRIGGER IF EXISTS {watch};
CREATE EVENT TRIGGER {watch} ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION {watch}();
"""


def _literal(text: str) -> str:
    """*text* as a SQL string literal (for SQL that builds SQL)."""
    return "'" + text.replace("'", "''") + "'"


def postgres_watch_new_tables(alias: str) -> str | None:
    """Install the event trigger that journals and fences tables created
    during the window. Call inside the window's transaction. Returns
    None, or why it could not (not a superuser): then nothing changed
    (a savepoint) and readiness names tables created later."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT current_schema()')
        schema = cursor.fetchone()[0]
    row_function = _ROW_FUNCTION_SQL.format(
        name='%1$I', fence=_FENCE_CHECK, journal=JOURNAL, new_key='%2$s',
        old_key='%3$s', old_row='%4$s', new_row='%5$s')
    sql = _WATCH_SQL.format(
        watch=WATCH, schema=_literal(schema), trigger=TRIGGER,
        function=FUNCTION, row_function=_literal(row_function))
    try:
        with transaction.atomic(using=alias), \
                connections[alias].cursor() as cursor:
            cursor.execute(sql)
    except DatabaseError as err:
        return str(err).strip().splitlines()[0]
    return None


def postgres_allow_copy_past_fence(alias: str) -> None:
    """Let this transaction's writes through a raised fence, unjournaled
    (a copy into PostgreSQL before a new window). Refreshes the trigger
    functions first when a window is there: one opened by an older
    release has functions that do not know the setting."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SET LOCAL {COPY_SETTING} = 'on'")
    if not postgres_journal_installed(alias):
        return
    with connections[alias].cursor() as cursor:
        cursor.execute(_INSTALL_SQL)
        # Row-level triggers only (tgtype bit 0): a table journaled by
        # the statement trigger has no row function to refresh.
        cursor.execute(
            'SELECT c.relname, array_agg(a.attname::text ORDER BY k.ord) '
            'FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid '
            'JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary '
            'CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY '
            'AS k(num, ord) JOIN pg_attribute a ON a.attrelid = c.oid '
            'AND a.attnum = k.num WHERE t.tgname = %s '
            'AND t.tgtype & 1 = 1 GROUP BY c.relname', [TRIGGER])
        for table, keys in cursor.fetchall():
            cursor.execute(_row_function_sql(
                _row_function(table), [_quote(alias, k) for k in keys]))


def _row_function(table: str) -> str:
    """The name of *table*'s row function (fits 63 bytes whatever the
    table's name)."""
    return f'{FUNCTION}_row_{hashlib.md5(table.encode()).hexdigest()[:12]}'


@dataclass(frozen=True)
class JournaledChange:
    table: str
    op: str        # I | U | D | T (truncate)
    pk: str | None
    txid: int


def _quote(alias: str, name: str) -> str:
    return connections[alias].ops.quote_name(name)


def postgres_journal_installed(alias: str) -> bool:
    """Are the journal's tables there (a window is open, or was)?"""
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT to_regclass(%s) IS NOT NULL', [JOURNAL])
        return cursor.fetchone()[0]


def postgres_install_journal(alias: str,
                             model_list: Sequence[type[models.Model]],
                             info: dict[str, Any], forced: bool) -> None:
    """Create the journal, fence flag and trigger function, lock the
    tables against writers, record the cutover row (*info*: the counts
    the caller took under that lock) and put the triggers on every table
    of *model_list*. Call inside one transaction on *alias* (the caller's
    atomic block): the cutover and the triggers commit together."""
    tables = [m._meta.db_table for m in model_list]
    with connections[alias].cursor() as cursor:
        cursor.execute(_INSTALL_SQL)
        # A new window: the flag open, an empty journal.
        cursor.execute(f'SELECT setval(%s, {OPEN}, true)', [FENCE])
        cursor.execute(f'TRUNCATE {JOURNAL}, {CUTOVER}')
        for model in model_list:
            table = _quote(alias, model._meta.db_table)
            row_function = _row_function(model._meta.db_table)
            cursor.execute(_row_function_sql(row_function, [
                _quote(alias, f.column) for f in model._meta.pk_fields]))
            cursor.execute(f'DROP TRIGGER IF EXISTS {TRIGGER} ON {table}')
            cursor.execute(f'DROP TRIGGER IF EXISTS {TRIGGER}_t ON {table}')
            cursor.execute(
                f'CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE '
                f'ON {table} FOR EACH ROW EXECUTE FUNCTION {row_function}()')
            cursor.execute(
                f'CREATE TRIGGER {TRIGGER}_t AFTER TRUNCATE ON {table} '
                f'FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()')
    # Tables made during the window: watched from now (or why not).
    unwatched = postgres_watch_new_tables(alias)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f'INSERT INTO {CUTOVER} (forced, info) VALUES (%s, %s)',
            [forced, json.dumps({**info, 'tables': tables,
                                 'new_tables_unwatched': unwatched})])


def postgres_lock_tables(alias: str, tables: Iterable[str]) -> None:
    """Block writers to *tables* until the open transaction ends, so the
    counts taken next are the cutover's exactly (readers go on)."""
    names = ', '.join(_quote(alias, t) for t in tables)
    if names:
        with connections[alias].cursor() as cursor:
            cursor.execute(f'LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE')


def postgres_remove_journal(alias: str,
                            tables: Iterable[str]) -> None:
    """End the window: triggers, function, journal, flag all dropped.
    Also the triggers on tables not in *tables* (a model removed since,
    a table made during the window), and whatever is left of a journal
    broken by hand (its table dropped: every write then failed)."""
    tables = sorted(set(tables) | set(postgres_trigger_tables(alias)))
    with connections[alias].cursor() as cursor:
        for table in tables:
            cursor.execute('SELECT to_regclass(%s) IS NOT NULL', [table])
            if cursor.fetchone()[0]:
                quoted = _quote(alias, table)
                cursor.execute(f'DROP TRIGGER IF EXISTS {TRIGGER} ON '
                               f'{quoted}')
                cursor.execute(f'DROP TRIGGER IF EXISTS {TRIGGER}_t ON '
                               f'{quoted}')
        cursor.execute("SELECT p.oid::regprocedure::text FROM pg_proc p "
                       "JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE p.proname LIKE %s AND n.nspname = "
                       "current_schema()", [f'{FUNCTION}_row_%'])
        for (signature,) in cursor.fetchall():
            cursor.execute(f'DROP FUNCTION IF EXISTS {signature} CASCADE')
        cursor.execute(f'DROP EVENT TRIGGER IF EXISTS {WATCH}')
        cursor.execute(f'DROP FUNCTION IF EXISTS {WATCH}() CASCADE')
        cursor.execute(f'DROP FUNCTION IF EXISTS {FUNCTION}() CASCADE')
        cursor.execute(f'DROP TABLE IF EXISTS {JOURNAL}, {CUTOVER}')
        cursor.execute(f'DROP SEQUENCE IF EXISTS {FENCE}')


def postgres_trigger_tables(alias: str) -> list[str]:
    """Tables carrying a journal trigger (row or TRUNCATE), enabled or
    not, whatever the journal's own state."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            'SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c '
            'ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = '
            'c.relnamespace WHERE t.tgname IN (%s, %s) AND n.nspname = '
            'current_schema() ORDER BY 1', [TRIGGER, f'{TRIGGER}_t'])
        return [row[0] for row in cursor.fetchall()]


def postgres_existing_tables(alias: str, tables: Iterable[str]
                             ) -> list[str]:
    """Those of *tables* that exist on *alias* (current schema)."""
    names = list(tables)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            'SELECT c.relname FROM pg_class c JOIN pg_namespace n ON '
            "n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND "
            'n.nspname = current_schema() AND c.relname = ANY(%s)',
            [names])
        return [row[0] for row in cursor.fetchall()]


def postgres_journal_parts(alias: str) -> dict[str, bool]:
    """Which of the window's objects exist: the journal and cutover
    tables, the fence flag and the statement function."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            'SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT '
            'NULL, to_regclass(%s) IS NOT NULL, to_regprocedure(%s) IS '
            'NOT NULL', [JOURNAL, CUTOVER, FENCE, f'{FUNCTION}()'])
        journal, cutover, fence, function = cursor.fetchone()
    return {JOURNAL: journal, CUTOVER: cutover, FENCE: fence,
            f'{FUNCTION}()': function}


def postgres_journaled_tables(alias: str) -> list[str]:
    """Tables that carry the journal trigger now."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            'SELECT c.relname FROM pg_trigger t JOIN pg_class c '
            'ON c.oid = t.tgrelid WHERE t.tgname = %s AND t.tgenabled '
            "<> 'D' ORDER BY 1", [TRIGGER])
        return [row[0] for row in cursor.fetchall()]


def postgres_cutover(alias: str) -> dict[str, Any] | None:
    """The recorded cutover (at, forced, info, snapshot), or None."""
    if not postgres_journal_installed(alias):
        return None
    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT at, forced, info, snapshot::text, '
                       f'txid::text FROM {CUTOVER} ORDER BY id DESC LIMIT 1')
        row = cursor.fetchone()
    if row is None:
        return None
    info = row[2] if isinstance(row[2], dict) else json.loads(row[2])
    return {'at': row[0], 'forced': row[1], 'info': info,
            'snapshot': row[3], 'txid': row[4]}


def postgres_fence_state(alias: str) -> str | None:
    """'up', 'open', or None when no journal is installed."""
    if not postgres_journal_installed(alias):
        return None
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT pg_sequence_last_value(%s::regclass)',
                       [FENCE])
        return 'up' if cursor.fetchone()[0] == UP else 'open'


def postgres_raise_fence(alias: str) -> None:
    """Refuse every later journaled write, now, in every session (the
    flag is not transactional: it holds even if this session dies)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT setval(%s, {UP}, true)', [FENCE])


def postgres_lower_fence(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT setval(%s, {OPEN}, true)', [FENCE])


def postgres_wait_for_writers(alias: str, timeout_ms: int) -> bool:
    """After postgres_raise_fence: wait until every transaction that
    wrote a journaled row has ended (they hold the fence lock shared).
    True when they have; False after *timeout_ms*. Takes and releases
    the lock in its own short transaction."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute('BEGIN')
        try:
            cursor.execute(f'SET LOCAL lock_timeout = {max(1, timeout_ms)}')
            cursor.execute(f'SELECT pg_advisory_xact_lock({FENCE_LOCK})')
        except DatabaseError:   # lock_timeout: reported as False
            cursor.execute('ROLLBACK')
            return False
        cursor.execute('COMMIT')
    return True


def postgres_open_writers(alias: str) -> list[dict[str, Any]]:
    """Sessions whose open transaction holds the fence lock shared: they
    wrote a journaled row and have not committed yet (pid, user, state,
    since)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            'SELECT a.pid, a.usename, a.state, a.xact_start FROM pg_locks l '
            'JOIN pg_stat_activity a ON a.pid = l.pid '
            "WHERE l.locktype = 'advisory' AND l.mode = 'ShareLock' "
            'AND l.granted AND l.database = (SELECT oid FROM pg_database '
            'WHERE datname = current_database()) '
            'AND ((l.classid::bigint << 32) | l.objid::bigint) = %s '
            'AND a.pid <> pg_backend_pid()', [FENCE_LOCK])
        return [{'pid': r[0], 'user': r[1], 'state': r[2],
                 'since': r[3]} for r in cursor.fetchall()]


def postgres_terminate(alias: str, pids: Iterable[int]) -> list[int]:
    """Ask the server to end these sessions (call outside a transaction);
    returns the pids it refused (another role's session, no privilege)."""
    refused = []
    with connections[alias].cursor() as cursor:
        for pid in pids:
            try:
                cursor.execute('SELECT pg_terminate_backend(%s)', [pid])
                if not cursor.fetchone()[0]:
                    refused.append(pid)
            except DatabaseError:   # permission denied
                refused.append(pid)
    return refused


@contextmanager
def postgres_snapshot_transaction(alias: str) -> Iterator[str]:
    """A REPEATABLE READ READ ONLY transaction for the block, yielding its
    snapshot (pg_current_snapshot() text) for the loss proof. Reads made
    inside (the copy's read_snapshot sees the atomic block) use it."""
    with transaction.atomic(using=alias), \
            connections[alias].cursor() as cursor:
        cursor.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, '
                       'READ ONLY')
        cursor.execute('SELECT pg_current_snapshot()::text')
        yield cursor.fetchone()[0]


def postgres_export_snapshot(alias: str) -> str:
    """The running transaction's snapshot exported for other sessions
    (pg_export_snapshot): importable until that transaction ends."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT pg_export_snapshot()')
        return cursor.fetchone()[0]


@contextmanager
def postgres_imported_snapshot(alias: str, exported: str) -> Iterator[None]:
    """A REPEATABLE READ READ ONLY transaction for the block that sees
    exactly the snapshot *exported* by another session, so two sessions
    can read one snapshot at once. Run it on a connection of its own
    (another thread's)."""
    with transaction.atomic(using=alias), \
            connections[alias].cursor() as cursor:
        cursor.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, '
                       'READ ONLY')
        cursor.execute('SET TRANSACTION SNAPSHOT %s', [exported])
        yield


def postgres_changes_after(alias: str, snapshot: str
                           ) -> list[JournaledChange]:
    """Every committed journal entry whose transaction is NOT visible in
    *snapshot*: writes a copy taken in that snapshot does not hold.
    (Journal ids are assigned before commit, so ids say nothing about
    visibility; the transaction id against the snapshot does, as in
    PgQ's batches.) Complete, never capped: a cap at 10,000 once made
    export_unapplied_writes drop 5,001 of 15,001 acknowledged writes.
    Only transactions from the snapshot's xmin on can be invisible to
    it: the txid index limits the scan to them."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f'SELECT tbl, op, pk, txid::text FROM {JOURNAL} WHERE txid >= '
            'pg_snapshot_xmin(%s::pg_snapshot) AND NOT '
            'pg_visible_in_snapshot(txid, %s::pg_snapshot) ORDER BY id',
            [snapshot, snapshot])
        return [JournaledChange(t, o, p, int(x))
                for t, o, p, x in cursor.fetchall()]


def postgres_table_after(alias: str, table: str,
                         pk_column: str | Sequence[str],
                         snapshot: str) -> tuple[int, list[str]]:
    """One pass over *table*: its row count now, and the keys (as the
    journal's text: key_sql) of every row whose current version was
    written by a transaction not visible in *snapshot* (by xmin: this
    sees writes the journal missed, e.g. a session with triggers
    disabled). *pk_column*: the key column, or a composite key's
    columns in key order. Complete, never capped."""
    quote = connections[alias].ops.quote_name
    columns = [pk_column] if isinstance(pk_column, str) else pk_column
    key = key_sql([quote(c) for c in columns])
    # xmin is 32 bits; widen it with the snapshot's epoch (a rollback
    # window is far shorter than 2^31 transactions). The expensive
    # widening runs only for rows no older than the snapshot's xmin:
    # age() is cheap, and in one statement every age() counts from the
    # same latest xid, so the cut is exact (older rows were committed
    # before the snapshot began).
    sql = (f'SELECT count(*), (array_agg({key}) FILTER ('
           'WHERE age(xmin) <= (SELECT age((pg_snapshot_xmin(%s::'
           'pg_snapshot)::text::bigint & 4294967295)::text::xid)) '
           'AND xmin::text::bigint > 2 AND NOT pg_visible_in_snapshot(('
           '(((pg_snapshot_xmax(%s::pg_snapshot)::text::bigint >> 32) '
           '- CASE WHEN xmin::text::bigint > (pg_snapshot_xmax('
           '%s::pg_snapshot)::text::bigint & 4294967295) THEN 1 ELSE 0 '
           'END) << 32) | xmin::text::bigint)::text::xid8, '
           f'%s::pg_snapshot))) FROM {quote(table)}')
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, [snapshot, snapshot, snapshot, snapshot])
        count, keys = cursor.fetchone()
    return count, list(keys or [])


def postgres_journal_net(alias: str) -> dict[str, dict[str, Any]]:
    """Per table since the cutover: inserts, deletes, updates, and
    whether it was truncated (then counts run from the last truncate)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f'WITH last_t AS (SELECT tbl, max(id) AS id FROM {JOURNAL} '
            "WHERE op = 'T' GROUP BY tbl) "
            "SELECT j.tbl, count(*) FILTER (WHERE op = 'I'), "
            "count(*) FILTER (WHERE op = 'D'), "
            "count(*) FILTER (WHERE op = 'U'), bool_or(t.id IS NOT NULL) "
            f'FROM {JOURNAL} j LEFT JOIN last_t t USING (tbl) '
            'WHERE t.id IS NULL OR j.id > t.id GROUP BY j.tbl')
        rows = cursor.fetchall()
        cursor.execute(f"SELECT DISTINCT tbl FROM {JOURNAL} WHERE op = 'T'")
        truncated = {r[0] for r in cursor.fetchall()}
    found = {t: {'inserted': i, 'deleted': d, 'updated': u,
                 'truncated': t in truncated}
             for t, i, d, u, _ in rows}
    for table in truncated - set(found):
        found[table] = {'inserted': 0, 'deleted': 0, 'updated': 0,
                        'truncated': True}
    return found


def postgres_journal_size(alias: str) -> dict[str, Any]:
    """Entries, bytes on disk, oldest entry time."""
    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT count(*), min(at), pg_total_relation_size('
                       f"'{JOURNAL}') FROM {JOURNAL}")
        count, oldest, size = cursor.fetchone()
    return {'entries': count, 'oldest': oldest, 'bytes': size}


# --- the standby's batches (replicate_changes) ------------------------------

# PgQ's batch rule: the entries of transactions that committed between two
# ticks (snapshots). A long transaction that began before the previous tick
# and commits after it is in the next batch, whatever its journal ids.
_BATCH_WHERE = ('txid >= pg_snapshot_xmin(%s::pg_snapshot) AND '
                'pg_visible_in_snapshot(txid, %s::pg_snapshot) AND NOT '
                'pg_visible_in_snapshot(txid, %s::pg_snapshot)')


@dataclass(frozen=True)
class JournalBatch:
    entries: int
    max_id: int | None
    truncated: tuple[str, ...]     # tables emptied in the batch
    tables: tuple[str, ...]        # tables with any entry


def postgres_batch(alias: str, prev: str, tick: str) -> JournalBatch:
    """What the journal holds between the ticks *prev* and *tick* (call
    inside the REPEATABLE READ transaction whose snapshot is *tick*)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"SELECT tbl, count(*), max(id), bool_or(op = 'T') "
            f'FROM {JOURNAL} WHERE {_BATCH_WHERE} GROUP BY tbl '
            'ORDER BY tbl', [prev, tick, prev])
        rows = cursor.fetchall()
    return JournalBatch(
        sum(r[1] for r in rows), max((r[2] for r in rows), default=None),
        tuple(r[0] for r in rows if r[3]), tuple(r[0] for r in rows))


def postgres_batch_keys(alias: str, prev: str, tick: str, table: str,
                        chunk_rows: int = 500) -> Iterator[list[str]]:
    """The distinct keys (text) of *table* changed in the batch, in
    chunks (a server-side cursor: memory stays flat however large the
    batch). Inside the batch's transaction."""
    from anthias_rollback.engines import postgresql

    sql = (f'SELECT DISTINCT pk FROM {JOURNAL} WHERE {_BATCH_WHERE} '
           "AND tbl = %s AND op <> 'T' AND pk IS NOT NULL ORDER BY pk")
    for rows in postgresql.fetch_chunks(alias, sql,
                                        [prev, tick, prev, table],
                                        chunk_rows=chunk_rows):
        yield [row[0] for row in rows]


@contextmanager
def postgres_tick(alias: str) -> Iterator[tuple[str, float]]:
    """postgres_snapshot_transaction that also yields the time, on
    PostgreSQL's clock, at which the snapshot's statement arrived: every
    write committed before it is in the snapshot (statement_timestamp()
    is taken before the snapshot is). A standby's position is stamped
    with it, never with this process's clock, which may be wrong (no
    RTC on a Raspberry Pi; NTP or a manual set moves it)."""
    with transaction.atomic(using=alias), \
            connections[alias].cursor() as cursor:
        cursor.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, '
                       'READ ONLY')
        cursor.execute('SELECT pg_current_snapshot()::text, '
                       'extract(epoch FROM statement_timestamp())')
        snapshot, at = cursor.fetchone()
        yield snapshot, float(at)


def postgres_clock(alias: str) -> float:
    """PostgreSQL's time now (UNIX seconds)."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT extract(epoch FROM clock_timestamp())')
        return float(cursor.fetchone()[0])


def postgres_pending(alias: str, snapshot: str) -> tuple[int, float]:
    """Committed journal entries a standby at *snapshot* does not hold,
    and the age of the oldest of them (0.0 when none), both measured on
    PostgreSQL's clock in one statement: a lag no local clock can fake."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f'SELECT count(*), coalesce(extract(epoch FROM '
            f'clock_timestamp() - min(at)), 0) FROM {JOURNAL} WHERE txid '
            '>= pg_snapshot_xmin(%s::pg_snapshot) AND NOT '
            'pg_visible_in_snapshot(txid, %s::pg_snapshot)',
            [snapshot, snapshot])
        count, age = cursor.fetchone()
        return count, max(0.0, float(age))


def postgres_pending_entries(alias: str, snapshot: str) -> int:
    """Committed journal entries a standby at *snapshot* does not hold."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f'SELECT count(*) FROM {JOURNAL} WHERE txid >= '
            'pg_snapshot_xmin(%s::pg_snapshot) AND NOT '
            'pg_visible_in_snapshot(txid, %s::pg_snapshot)',
            [snapshot, snapshot])
        return cursor.fetchone()[0]


def postgres_current_txid(alias: str) -> str:
    """This transaction's id (xid8 text): inside open_window's
    transaction it is the cutover row's txid, the window's identity."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SELECT pg_current_xact_id()::text')
        return cursor.fetchone()[0]
