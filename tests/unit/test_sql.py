"""SQL core: parsing, canonical form, transpiling, the single-SELECT guard, read-only execution
(SQLite and the local PostgreSQL), schema snapshots and databases.json resolution."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from pipelines.common import databases
from pipelines.common.errors import PipelineError
from pipelines.common.schema import SchemaSnapshot, introspect
from pipelines.common.sql import (
    SQLError,
    SQLExecutionError,
    SQLParseError,
    SQLTimeoutError,
    UnsafeSQLError,
    check_single_select,
    execute_readonly,
    is_single_select,
    parse_sql,
    to_canonical,
    transpile,
)

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
LOOP_FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"


@pytest.fixture
def shop_db(tmp_path):
    path = tmp_path / "shop.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id),
                             amount REAL);
    """)
    con.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                    [(i, f"name{i}", None if i % 3 == 0 else f"city{i % 4}") for i in range(1, 21)])
    con.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, 1 + i % 20, i * 1.5) for i in range(1, 41)])
    con.commit()
    con.close()
    return path


# --- parsing / canonical form / transpiling -------------------------------------------------

def test_parse_error_carries_parser_message():
    with pytest.raises(SQLParseError, match="Line 1"):
        parse_sql("SELECT FROM WHERE")
    with pytest.raises(SQLParseError, match="empty"):
        parse_sql("   ")


def test_canonical_from_mysql_drops_backticks_but_keeps_needed_quotes():
    canonical = to_canonical("SELECT COUNT(*) FROM `Faculty` WHERE `order` = 'x' AND `my col` > 1", "mysql")
    assert canonical == "SELECT COUNT(*) FROM Faculty WHERE \"order\" = 'x' AND \"my col\" > 1"
    # MySQL double quotes are strings; the canonical form says so in SQLite terms.
    assert to_canonical('SELECT name FROM t WHERE name = "Bob"', "mysql") == \
        "SELECT name FROM t WHERE name = 'Bob'"


def test_canonical_sqlite_double_quoted_string_rule():
    sql = 'SELECT name FROM singer WHERE country = "France" AND "name" <> \'x\''
    canonical = to_canonical(sql, "sqlite", column_names={"name", "country"})
    assert canonical == "SELECT name FROM singer WHERE country = 'France' AND name <> 'x'"


def test_canonical_drops_a_qualifier_naming_the_database_itself():
    sql = "SELECT c.name FROM `shop`.`customers` AS c JOIN other.orders AS o ON o.cid = c.id"
    assert to_canonical(sql, "mysql", database="shop") == \
        "SELECT c.name FROM customers AS c JOIN other.orders AS o ON o.cid = c.id"


def test_canonical_is_idempotent():
    once = to_canonical("select T1.name from `a` as T1 join b as T2 on T1.id = T2.a_id limit 3", "mysql")
    assert to_canonical(once) == once


def test_transpile_to_postgres():
    assert transpile("SELECT SUBSTR(name, 1, 2) FROM t", "postgres") == \
        "SELECT SUBSTRING(name FROM 1 FOR 2) FROM t"
    assert transpile("SELECT 1", "sqlite") == "SELECT 1"


# --- single SELECT guard ----------------------------------------------------------------------

@pytest.mark.parametrize("sql, reason", [
    ("SELECT 1; SELECT 2", "one statement"),
    ("DELETE FROM customers", "DELETE"),
    ("UPDATE customers SET name = 'x'", "UPDATE"),
    ("DROP TABLE customers", "DROP"),
    ("PRAGMA table_info(customers)", "PRAGMA"),
    ("ATTACH DATABASE 'x.db' AS x", "ATTACH"),
    ("VACUUM", "VACUUM"),
    ("WITH d AS (DELETE FROM customers RETURNING *) SELECT * FROM d", "DELETE"),
    ("SELECT * INTO copy FROM customers", "INTO"),
    ("SELECT load_extension('evil')", "load_extension"),
])
def test_check_single_select_rejects(sql, reason):
    with pytest.raises(UnsafeSQLError, match=reason):
        check_single_select(sql)
    assert not is_single_select(sql)


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "SELECT name FROM customers UNION SELECT city FROM customers",
    "WITH big AS (SELECT * FROM orders WHERE amount > 3) SELECT COUNT(*) FROM big",
    "(SELECT 1)",
])
def test_check_single_select_accepts(sql):
    assert is_single_select(sql)


# --- SQLite execution ------------------------------------------------------------------------

def test_sqlite_rows_columns_and_truncation(shop_db):
    result = execute_readonly(shop_db, "SELECT id, name FROM customers ORDER BY id", max_rows=5)
    assert result.columns == ["id", "name"]
    assert result.rows == [(i, f"name{i}") for i in range(1, 6)]
    assert result.truncated
    full = execute_readonly(shop_db, "SELECT COUNT(*) FROM orders WHERE amount LIKE '%5'", max_rows=5)
    assert not full.truncated and full.rows == [(20,)]


def test_sqlite_time_limit(shop_db):
    with pytest.raises(SQLTimeoutError, match="0.3 s"):
        execute_readonly(shop_db, LOOP_FOREVER, timeout_s=0.3)


def test_sqlite_errors_are_readable(shop_db, tmp_path):
    with pytest.raises(SQLExecutionError, match="no such column: nope"):
        execute_readonly(shop_db, "SELECT nope FROM customers")
    with pytest.raises(SQLExecutionError, match="not found"):
        execute_readonly(tmp_path / "missing.sqlite", "SELECT 1")
    assert not (tmp_path / "missing.sqlite").exists()  # read-only mode never creates a file


def test_sqlite_guard_runs_before_the_database(shop_db):
    with pytest.raises(UnsafeSQLError):
        execute_readonly(shop_db, "DELETE FROM customers")
    assert execute_readonly(shop_db, "SELECT COUNT(*) FROM customers").rows == [(20,)]


def test_sqlite_connection_itself_is_read_only(shop_db):
    """Even SQL that slipped past the parser check cannot write: mode=ro + authorizer."""
    from pipelines.common.sql import _execute_sqlite

    with pytest.raises(SQLExecutionError):
        _execute_sqlite(shop_db, "DELETE FROM customers", 1.0, 10)
    with pytest.raises(SQLExecutionError):
        _execute_sqlite(shop_db, "PRAGMA writable_schema = 1", 1.0, 10)
    assert execute_readonly(shop_db, "SELECT COUNT(*) FROM customers").rows == [(20,)]


# --- PostgreSQL execution --------------------------------------------------------------------

@pytest.fixture
def pg_schema():
    sa = pytest.importorskip("sqlalchemy")
    schema = f"nl2sql_test_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(databases.connectable_url(PG_URL))
    try:
        with engine.begin() as con:
            con.exec_driver_sql(f"""
                CREATE SCHEMA {schema};
                CREATE TABLE {schema}.customers (id INT PRIMARY KEY, name TEXT NOT NULL, city TEXT);
                CREATE TABLE {schema}.orders (id INT PRIMARY KEY,
                                              customer_id INT REFERENCES {schema}.customers(id));
                INSERT INTO {schema}.customers
                    SELECT g, 'name' || g, 'c' || mod(g, 3) FROM generate_series(1, 30) g;
                CREATE FUNCTION {schema}.sneaky_write() RETURNS INT LANGUAGE sql AS
                    $$ INSERT INTO {schema}.customers VALUES (999, 'x', NULL) RETURNING 1 $$;
            """)
    except sa.exc.OperationalError as exc:
        pytest.skip(f"local PostgreSQL not reachable: {exc.orig}")
    yield schema, f"{PG_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as con:
        con.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    engine.dispose()


@pytest.mark.postgres
def test_postgres_select_transpiled_and_limited(pg_schema):
    _, url = pg_schema
    # SQLite's SUBSTR and a LIKE with '%' go through transpiling and the driver untouched.
    result = execute_readonly(url, "SELECT SUBSTR(name, 1, 4) AS p FROM customers WHERE name LIKE 'name1%' "
                                   "ORDER BY id", max_rows=3)
    assert result.columns == ["p"] and result.rows == [("name",)] * 3 and result.truncated


@pytest.mark.postgres
def test_postgres_read_only_transaction_blocks_writes_hidden_in_a_select(pg_schema):
    schema, url = pg_schema
    with pytest.raises(SQLExecutionError, match="read-only transaction"):
        execute_readonly(url, "SELECT sneaky_write()")
    assert execute_readonly(url, "SELECT COUNT(*) FROM customers").rows == [(30,)]


@pytest.mark.postgres
def test_postgres_statement_timeout(pg_schema):
    _, url = pg_schema
    with pytest.raises(SQLTimeoutError):
        execute_readonly(url, "SELECT COUNT(*) FROM customers a, customers b, customers c, customers d, "
                              "customers e, customers f", timeout_s=0.3)


@pytest.mark.postgres
def test_postgres_introspection(pg_schema):
    _, url = pg_schema
    snapshot = introspect(url, "pg_shop", sample_values=2)
    assert snapshot.dialect == "postgres"
    customers = snapshot.table("customers")
    assert [c.name for c in customers.columns] == ["id", "name", "city"]
    assert customers.column("id").primary_key and not customers.column("name").nullable
    assert customers.column("city").samples == ["c0", "c1"]
    assert [fk.model_dump() for fk in snapshot.foreign_keys] == [
        {"table": "orders", "column": "customer_id", "ref_table": "customers", "ref_column": "id"}]


def test_unreachable_server_message_masks_password():
    url = "postgresql://postgres:hunter2@127.0.0.1:1/test"
    with pytest.raises(SQLExecutionError, match="cannot connect") as info:
        execute_readonly(url, "SELECT 1", timeout_s=1)
    assert "hunter2" not in str(info.value)
    with pytest.raises(PipelineError, match=r"postgres:\*\*\*@") as info:
        databases.check_reachable(url)
    assert "hunter2" not in str(info.value)


# --- schema snapshot ---------------------------------------------------------------------------

def test_introspect_sqlite_and_round_trip(shop_db, tmp_path):
    snapshot = introspect(shop_db, "shop", sample_values=3)
    assert snapshot.dialect == "sqlite"
    customers = snapshot.table("CUSTOMERS")
    assert customers.column("id").primary_key and not customers.column("id").nullable
    assert customers.column("name").nullable is False
    assert customers.column("city").samples == ["city0", "city1", "city2"]  # distinct, NULLs skipped
    assert snapshot.foreign_keys[0].model_dump() == {
        "table": "orders", "column": "customer_id", "ref_table": "customers", "ref_column": "id"}
    path = tmp_path / "out" / "shop.json"
    snapshot.save(path)
    assert set(json.loads(path.read_text())) == {"db_id", "dialect", "tables", "foreign_keys"}
    assert SchemaSnapshot.load(path) == snapshot


def test_schema_load_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"db_id": "x",\n "tables": [}')
    with pytest.raises(PipelineError, match=r"bad.json: line 2"):
        SchemaSnapshot.load(bad_json)
    wrong_shape = tmp_path / "wrong.json"
    wrong_shape.write_text(json.dumps({"db_id": "x", "tables": [{"name": "t"}]}))
    with pytest.raises(PipelineError, match=r"wrong.json: .*tables.0.columns"):
        SchemaSnapshot.load(wrong_shape)
    with pytest.raises(PipelineError, match="not found"):
        SchemaSnapshot.load(tmp_path / "absent.json")


# --- databases.json ----------------------------------------------------------------------------

def test_databases_index_resolve(tmp_path):
    index_path = tmp_path / "ingested" / "databases.json"
    databases.write_index({"shop": "databases/shop.sqlite", "pg": PG_URL}, index_path)
    assert databases.resolve("shop", index_path) == str(tmp_path / "ingested" / "databases" / "shop.sqlite")
    assert databases.resolve("pg", index_path) == PG_URL
    with pytest.raises(PipelineError, match=r"databases.json: unknown db_id 'nope' \(known: pg, shop\)"):
        databases.resolve("nope", index_path)


def test_mask_url_and_dialects():
    assert databases.mask_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert databases.sqlglot_dialect("postgresql+psycopg2://h/db") == "postgres"
    assert databases.sqlglot_dialect("data/x.sqlite") == "sqlite"
    assert databases.sqlite_path("sqlite:////tmp/x.sqlite").as_posix() == "/tmp/x.sqlite"


def test_deeply_nested_model_output_is_a_parse_error_not_a_crash(tmp_path):
    import sqlite3

    db = tmp_path / "nested.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE t (a INT)").connection.close()
    nested = "select a from t where a = " + "( " * 5000 + "1" + " )" * 5000
    with pytest.raises(SQLParseError, match="nested too deeply"):
        parse_sql(nested)
    with pytest.raises(SQLError):
        execute_readonly(db, nested, timeout_s=1.0, max_rows=1)
