"""The demo retail database: tables, real foreign keys, sizes, believable values, determinism,
atomic write."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from pipelines.demo_data import build_demo_database

EXPECTED_FOREIGN_KEYS = {
    ("products", "category_id", "categories", "category_id"),
    ("products", "supplier_id", "suppliers", "supplier_id"),
    ("employees", "store_id", "stores", "store_id"),
    ("employees", "manager_id", "employees", "employee_id"),
    ("orders", "customer_id", "customers", "customer_id"),
    ("orders", "store_id", "stores", "store_id"),
    ("orders", "employee_id", "employees", "employee_id"),
    ("order_items", "order_id", "orders", "order_id"),
    ("order_items", "product_id", "products", "product_id"),
}


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite"
    build_demo_database(path, n_customers=600, seed=42)
    return path


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _count(conn: sqlite3.Connection, sql: str) -> int:
    return conn.execute(sql).fetchone()[0]


def test_tables_and_foreign_keys(demo_db):
    conn = _connect(demo_db)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"categories", "suppliers", "products", "stores", "employees", "customers", "orders",
                      "order_items"}
    foreign_keys = {(table, row[3], row[2], row[4])
                    for table in tables for row in conn.execute(f"PRAGMA foreign_key_list({table})")}
    assert foreign_keys == EXPECTED_FOREIGN_KEYS
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_row_counts_scale_with_customers(demo_db, tmp_path):
    conn = _connect(demo_db)
    tables = ("categories", "suppliers", "products", "stores", "employees", "customers", "orders",
              "order_items")
    counts = {t: _count(conn, f"SELECT COUNT(*) FROM {t}") for t in tables}
    assert counts["customers"] == 600
    assert counts["categories"] == 10
    assert counts["products"] == 150 and counts["stores"] == 12 and counts["suppliers"] == 24
    assert 40 <= counts["employees"] <= 12 * 9
    assert 1500 <= counts["orders"] <= 3500
    assert counts["order_items"] >= 2 * counts["orders"]
    assert sum(counts.values()) > 5000

    small = tmp_path / "small.sqlite"
    build_demo_database(small, n_customers=40, seed=42)
    assert _count(_connect(small), "SELECT COUNT(*) FROM customers") == 40


def test_values_are_believable(demo_db):
    conn = _connect(demo_db)
    assert _count(conn, "SELECT COUNT(DISTINCT email) FROM customers") == 600
    assert _count(conn, "SELECT COUNT(*) FROM customers WHERE email NOT LIKE '%_@_%._%'") == 0
    assert _count(conn, "SELECT COUNT(DISTINCT city) FROM customers") >= 20
    statuses = {s for (s,) in conn.execute("SELECT DISTINCT status FROM orders")}
    assert statuses == {"delivered", "shipped", "processing", "cancelled", "returned"}
    low, high = conn.execute("SELECT MIN(unit_price), MAX(unit_price) FROM products").fetchone()
    assert 2 <= low < high <= 901
    # Orders never precede the customer's signup; items are priced at the product's list price.
    assert _count(conn, "SELECT COUNT(*) FROM orders AS o JOIN customers AS c "
                        "ON o.customer_id = c.customer_id WHERE o.order_date < c.signup_date") == 0
    assert _count(conn, "SELECT COUNT(*) FROM order_items AS i JOIN products AS p "
                        "ON i.product_id = p.product_id WHERE i.unit_price <> p.unit_price") == 0
    for (day,) in conn.execute("SELECT order_date FROM orders"):
        assert dt.date(2019, 1, 1) <= dt.date.fromisoformat(day) <= dt.date(2024, 12, 31)
    # Every store has exactly one manager, who reports to nobody.
    assert _count(conn, "SELECT COUNT(*) FROM employees "
                        "WHERE job_title = 'Store Manager' AND manager_id IS NULL") == 12
    # Some customers never ordered: NOT IN questions have answers.
    assert _count(conn, "SELECT COUNT(*) FROM customers "
                        "WHERE customer_id NOT IN (SELECT customer_id FROM orders)") > 0


def _dump(path: Path) -> list[str]:
    return list(_connect(path).iterdump())


def test_deterministic_for_a_seed(demo_db, tmp_path):
    again, other = tmp_path / "again.sqlite", tmp_path / "other.sqlite"
    build_demo_database(again, n_customers=600, seed=42)
    build_demo_database(other, n_customers=600, seed=7)
    assert _dump(again) == _dump(demo_db)
    assert _dump(other) != _dump(demo_db)


def test_written_atomically_and_replaces_existing(tmp_path):
    path = tmp_path / "demo.sqlite"
    path.write_text("not a database")
    build_demo_database(path, n_customers=20, seed=1)
    assert _count(_connect(path), "SELECT COUNT(*) FROM customers") == 20
    assert [p.name for p in tmp_path.iterdir()] == ["demo.sqlite"]


def test_failed_build_leaves_previous_file(tmp_path, monkeypatch):
    import pipelines.demo_data as demo_data

    path = tmp_path / "demo.sqlite"
    build_demo_database(path, n_customers=20, seed=1)
    before = path.read_bytes()
    monkeypatch.setattr(demo_data, "SCHEMA_DDL", "CREATE TABLE broken (")
    with pytest.raises(sqlite3.Error):
        build_demo_database(path, n_customers=20, seed=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.sqlite"]
