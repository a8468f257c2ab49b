"""SQL handling in one place (sqlglot): parsing, the canonical SQLite form every artifact stores,
transpiling to a target database's dialect, and safe execution of untrusted SQL.

Generated SQL is untrusted. `execute_readonly` is the only way the pipeline runs it: one SELECT
statement only (checked on the parse tree), a read-only connection, a time limit and a row limit."""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError, TokenError

CANONICAL_DIALECT = "sqlite"


class SQLError(Exception):
    """Base of every per-query problem; callers scoring many queries catch this one."""


class SQLParseError(SQLError, ValueError):
    """The SQL does not parse in the given dialect; the message is the parser's."""


class UnsafeSQLError(SQLError, ValueError):
    """The SQL is not a single read-only SELECT; the message says why."""


class SQLExecutionError(SQLError):
    """The database rejected the query or failed while running it."""


class SQLTimeoutError(SQLExecutionError):
    """The query ran past its time limit and was interrupted."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    truncated: bool = False


# SQLite's keywords (https://sqlite.org/lang_keywords.html): identifiers with these names stay quoted.
SQLITE_KEYWORDS = frozenset("""
ABORT ACTION ADD AFTER ALL ALTER ALWAYS ANALYZE AND AS ASC ATTACH AUTOINCREMENT BEFORE BEGIN BETWEEN BY
CASCADE CASE CAST CHECK COLLATE COLUMN COMMIT CONFLICT CONSTRAINT CREATE CROSS CURRENT CURRENT_DATE
CURRENT_TIME CURRENT_TIMESTAMP DATABASE DEFAULT DEFERRABLE DEFERRED DELETE DESC DETACH DISTINCT DO DROP
EACH ELSE END ESCAPE EXCEPT EXCLUDE EXCLUSIVE EXISTS EXPLAIN FAIL FILTER FIRST FOLLOWING FOR FOREIGN FROM
FULL GENERATED GLOB GROUP GROUPS HAVING IF IGNORE IMMEDIATE IN INDEX INDEXED INITIALLY INNER INSERT INSTEAD
INTERSECT INTO IS ISNULL JOIN KEY LAST LEFT LIKE LIMIT MATCH MATERIALIZED NATURAL NO NOT NOTHING NOTNULL
NULL NULLS OF OFFSET ON OR ORDER OTHERS OUTER OVER PARTITION PLAN PRAGMA PRECEDING PRIMARY QUERY RAISE
RANGE RECURSIVE REFERENCES REGEXP REINDEX RELEASE RENAME REPLACE RESTRICT RETURNING RIGHT ROLLBACK ROW ROWS
SAVEPOINT SELECT SET TABLE TEMP TEMPORARY THEN TIES TO TRANSACTION TRIGGER UNBOUNDED UNION UNIQUE UPDATE
USING VACUUM VALUES VIEW VIRTUAL WHEN WHERE WINDOW WITH WITHOUT
""".split())
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # sqlglot underlines the error position for terminals
_PLAIN_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Dialects whose identifiers are case-insensitive, so dropping quotes cannot change what a name means.
_CASE_INSENSITIVE_DIALECTS = {"sqlite", "mysql"}

# Statement kinds that change data, schema, session or server state; none may appear anywhere in a query.
_FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.TruncateTable,
    exp.Into, exp.Pragma, exp.Attach, exp.Detach, exp.Command, exp.Set, exp.Use, exp.Transaction,
    exp.Commit, exp.Rollback, exp.Copy, exp.LoadData, exp.Grant, exp.Revoke, exp.Kill, exp.Analyze,
    exp.Cache, exp.Uncache, exp.Refresh, exp.Lock, exp.Describe,
)
# Functions with side effects outside the query (files, extensions, other sessions, settings).
_FORBIDDEN_FUNCTIONS = frozenset({
    "load_extension", "writefile", "readfile", "edit", "fts3_tokenizer",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_import", "lo_export",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "set_config", "dblink", "dblink_exec",
    "pg_advisory_lock", "pg_advisory_xact_lock", "nextval", "setval",
    "sleep", "benchmark", "get_lock", "load_file",
})


def parse_sql(sql: str, dialect: str = CANONICAL_DIALECT) -> exp.Expression:
    """Parse exactly one statement; SQLParseError carries the parser's message."""
    statements = _parse_all(sql, dialect)
    if len(statements) != 1:
        raise SQLParseError(f"expected one SQL statement, found {len(statements)}")
    return statements[0]


def _parse_all(sql: str, dialect: str) -> list[exp.Expression]:
    if not isinstance(sql, str) or not sql.strip():
        raise SQLParseError("empty SQL")
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except (ParseError, TokenError) as exc:
        raise SQLParseError(_ANSI_ESCAPE.sub("", str(exc)).strip()) from exc
    except SqlglotError as exc:
        raise SQLParseError(f"{exc.__class__.__name__}: {exc}") from exc
    except RecursionError as exc:
        # Model output such as "( ( ( ( ..." nests deeper than the recursive-descent parser can follow.
        raise SQLParseError("SQL nested too deeply to parse") from exc
    if not statements:
        raise SQLParseError("no SQL statement found")
    return statements


def _unquote_safe_identifiers(expression: exp.Expression) -> exp.Expression:
    """Drop quotes from identifiers that need none (plain names, not SQLite keywords)."""
    unquoted = expression.copy()
    for identifier in unquoted.find_all(exp.Identifier):
        name = identifier.this
        if identifier.quoted and _PLAIN_IDENTIFIER.match(name) and name.upper() not in SQLITE_KEYWORDS:
            identifier.set("quoted", False)
    # Keep the unquoted form only if it reads back as the same query (sqlglot knows more keywords).
    try:
        reparsed = sqlglot.parse_one(unquoted.sql(CANONICAL_DIALECT), read=CANONICAL_DIALECT)
    except SqlglotError:
        return expression
    same = reparsed.sql(CANONICAL_DIALECT, identify=True) == expression.sql(CANONICAL_DIALECT, identify=True)
    return unquoted if same else expression


def _double_quoted_strings_to_literals(expression: exp.Expression, column_names: set[str]) -> exp.Expression:
    """SQLite reads "x" as a string when no column is named x (Spider's gold SQL relies on it);
    make that explicit so the query means the same in every dialect."""
    for column in list(expression.find_all(exp.Column)):
        identifier = column.this
        if (isinstance(identifier, exp.Identifier) and identifier.quoted and not column.table
                and identifier.this.lower() not in column_names):
            column.replace(exp.Literal.string(identifier.this))
    return expression


def to_canonical(sql: str, source_dialect: str = CANONICAL_DIALECT,
                 column_names: set[str] | None = None, database: str | None = None) -> str:
    """The canonical form stored in every artifact: one statement printed by sqlglot in SQLite dialect,
    without quotes that are not needed. `column_names` (lower-case, all columns of the database)
    enables SQLite's double-quoted-string rule for SQLite sources; tables qualified with `database`
    (MySQL's `db.table` naming the database itself) lose the qualifier, as SQLite has one per file."""
    expression = parse_sql(sql, source_dialect)
    if database is not None:
        for table in expression.find_all(exp.Table):
            if table.db == database and not table.catalog:
                table.set("db", None)
    if column_names is not None and source_dialect == CANONICAL_DIALECT:
        expression = _double_quoted_strings_to_literals(expression, column_names)
    if source_dialect in _CASE_INSENSITIVE_DIALECTS:
        expression = _unquote_safe_identifiers(expression)
    try:
        return expression.sql(CANONICAL_DIALECT)
    except SqlglotError as exc:
        raise SQLParseError(f"cannot write as SQLite: {exc}") from exc


def transpile(sql: str, target_dialect: str, source_dialect: str = CANONICAL_DIALECT) -> str:
    """`sql` (one statement, canonical SQLite unless told otherwise) written in `target_dialect`."""
    if target_dialect == source_dialect:
        return sql
    expression = parse_sql(sql, source_dialect)
    try:
        return expression.sql(target_dialect)
    except SqlglotError as exc:
        raise SQLParseError(f"cannot write as {target_dialect}: {exc}") from exc


def check_single_select(sql: str, dialect: str = CANONICAL_DIALECT) -> exp.Expression:
    """The parsed query if it is exactly one read-only SELECT (or UNION/INTERSECT/EXCEPT of SELECTs);
    UnsafeSQLError naming the reason otherwise. SQLParseError when it does not parse at all."""
    statements = _parse_all(sql, dialect)
    if len(statements) > 1:
        raise UnsafeSQLError(f"only one statement is allowed, found {len(statements)}")
    query = statements[0]
    root = query.unnest() if isinstance(query, exp.Subquery) else query
    if not isinstance(root, (exp.Select, exp.SetOperation)):
        raise UnsafeSQLError(f"only SELECT queries are allowed, not {_kind(root)}")
    for node in query.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise UnsafeSQLError(f"{_kind(node)} is not allowed inside a query")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name in _FORBIDDEN_FUNCTIONS:
                raise UnsafeSQLError(f"function {name}() is not allowed")
    return query


def is_single_select(sql: str, dialect: str = CANONICAL_DIALECT) -> bool:
    try:
        check_single_select(sql, dialect)
    except SQLError:
        return False
    return True


def _kind(node: exp.Expression) -> str:
    if isinstance(node, exp.Command):
        return f"{str(node.this).upper()} command"
    return {exp.Into: "SELECT ... INTO"}.get(type(node), type(node).__name__.upper())


def execute_readonly(target: str | Path, sql: str, *, dialect: str = CANONICAL_DIALECT,
                     timeout_s: float = 5.0, max_rows: int = 10_000) -> QueryResult:
    """Run one untrusted SELECT on `target` (SQLite path or SQLAlchemy URL) read-only, within
    `timeout_s` seconds, returning at most `max_rows` rows (`truncated` says there were more)."""
    from pipelines.common.databases import mask_url, sqlglot_dialect, sqlite_path

    check_single_select(sql, dialect)
    target_dialect = sqlglot_dialect(target)
    runnable = transpile(sql, target_dialect, source_dialect=dialect)
    path = sqlite_path(target)
    if path is not None:
        return _execute_sqlite(path, runnable, timeout_s, max_rows)
    try:
        return _execute_sqlalchemy(str(target), runnable, timeout_s, max_rows)
    except SQLError as exc:
        # Driver messages can echo the connection string; never show a password.
        raise type(exc)(str(exc).replace(str(target), mask_url(target))) from exc


# SQLite authorizer actions a SELECT needs; everything else (PRAGMA, ATTACH, writes) is denied.
_SQLITE_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                           getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _sqlite_authorizer(action, arg1, arg2, _db, _trigger):
    if action not in _SQLITE_ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _FORBIDDEN_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _execute_sqlite(path: Path, sql: str, timeout_s: float, max_rows: int) -> QueryResult:
    from pipelines.common.databases import readonly_sqlite_uri

    if not path.is_file():
        raise SQLExecutionError(f"{path}: SQLite database file not found")
    deadline = time.monotonic() + timeout_s
    timed_out = False

    def past_deadline() -> int:
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return int(timed_out)

    connection = sqlite3.connect(readonly_sqlite_uri(path), uri=True, timeout=timeout_s)
    try:
        connection.set_authorizer(_sqlite_authorizer)
        # Called every ~10k virtual machine instructions: a non-zero return interrupts the query.
        connection.set_progress_handler(past_deadline, 10_000)
        cursor = connection.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
        columns = [d[0] for d in cursor.description or []]
    except sqlite3.Error as exc:
        if timed_out:
            raise SQLTimeoutError(f"query exceeded the time limit of {timeout_s:g} s") from exc
        raise SQLExecutionError(f"{path.name}: {exc}") from exc
    finally:
        connection.close()
    return _result(columns, rows, max_rows)


def _read_only_setup(backend: str, timeout_s: float) -> list[str]:
    """Statements, run first in the transaction, that make it read-only with a statement time limit."""
    ms = max(1, int(timeout_s * 1000))
    if backend == "postgresql":
        return ["SET TRANSACTION READ ONLY", f"SET LOCAL statement_timeout = {ms}"]
    if backend in ("mysql", "mariadb"):
        return [f"SET SESSION max_execution_time = {ms}", "SET SESSION TRANSACTION READ ONLY"]
    raise SQLExecutionError(f"read-only execution is not supported on {backend!r} databases")


def _is_timeout(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in ("statement timeout", "canceling statement",
                                             "max_execution_time", "maximum statement execution time"))


def _execute_sqlalchemy(url: str, sql: str, timeout_s: float, max_rows: int) -> QueryResult:
    import sqlalchemy as sa

    from pipelines.common.databases import backend as backend_of
    from pipelines.common.databases import connectable_url

    backend = backend_of(url)
    setup = _read_only_setup(backend, timeout_s)
    connect_args = {"connect_timeout": max(1, int(timeout_s))} if backend == "postgresql" else {}
    engine = sa.create_engine(connectable_url(url), connect_args=connect_args, poolclass=sa.pool.NullPool)
    # The DBAPI connection directly: the SQL goes to the driver untouched (no bind-parameter or
    # %-format processing of literals such as LIKE 'a%' or ':x').
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        raw = engine.raw_connection()
    except (dbapi_error, sa.exc.DBAPIError) as exc:
        engine.dispose()
        raise SQLExecutionError(f"cannot connect: {_first_line(exc)}") from exc
    try:
        setup_cursor = raw.cursor()
        for statement in setup:
            setup_cursor.execute(statement)
        # PostgreSQL: a named (server-side) cursor, so a huge result is not pulled to the client first.
        cursor = raw.cursor(name="nl2sql_readonly") if backend == "postgresql" else setup_cursor
        cursor.execute(sql)
        rows = cursor.fetchmany(max_rows + 1)
        columns = [d[0] for d in cursor.description or []]
        cursor.close()
    except dbapi_error as exc:
        if _is_timeout(exc):
            raise SQLTimeoutError(f"query exceeded the time limit of {timeout_s:g} s") from exc
        raise SQLExecutionError(_first_line(exc)) from exc
    finally:
        try:
            raw.rollback()
        finally:
            raw.close()
            engine.dispose()
    return _result(columns, rows, max_rows)


def _result(columns: list[str], rows: list, max_rows: int) -> QueryResult:
    """Rows were fetched up to max_rows + 1: one more than allowed means the result was cut."""
    return QueryResult(columns=columns, rows=[tuple(r) for r in rows[:max_rows]],
                       truncated=len(rows) > max_rows)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
