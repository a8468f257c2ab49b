"""Schema-driven synthetic pairs: naming helpers, coverage of every SQL construct (read off the sqlglot
AST, not off the generator's own labels), execution, uniqueness, determinism, and other schemas."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

from pipelines.common.schema import introspect
from pipelines.common.sql import execute_readonly
from pipelines.common.synthetic import generate_pairs, humanize, plural, singular
from pipelines.demo_data import build_demo_database

CONSTRUCTS = (
    "projection", "filter_eq", "filter_lt", "filter_gt", "filter_like", "filter_between",
    "count", "avg", "sum", "min", "max", "group_by", "group_by_having", "order_by_limit", "distinct",
    "join_1_hop", "join_2_hops", "in_subquery", "not_in_subquery", "scalar_subquery",
    "union", "intersect", "except",
)


def _is_subquery(node: exp.Expression | None) -> bool:
    return isinstance(node, (exp.Subquery, exp.Select))


def constructs(sql: str) -> set[str]:
    """The constructs a query uses, read from its sqlglot parse tree."""
    tree = sqlglot.parse_one(sql, read="sqlite")
    found = set()
    for kind, name in ((exp.Union, "union"), (exp.Intersect, "intersect"), (exp.Except, "except"),
                       (exp.Like, "filter_like"), (exp.Between, "filter_between"), (exp.Count, "count"),
                       (exp.Avg, "avg"), (exp.Sum, "sum"), (exp.Min, "min"), (exp.Max, "max")):
        if tree.find(kind):
            found.add(name)
    for select in tree.find_all(exp.Select):
        joins = select.args.get("joins") or []
        if len(joins) == 1:
            found.add("join_1_hop")
        if len(joins) == 2:
            found.add("join_2_hops")
        if select.args.get("group"):
            found.add("group_by_having" if select.args.get("having") else "group_by")
        if select.args.get("order") and select.args.get("limit"):
            found.add("order_by_limit")
        counts_distinct = any(isinstance(c.this, exp.Distinct) for c in select.find_all(exp.Count))
        if select.args.get("distinct") or counts_distinct:
            found.add("distinct")
        where = select.args.get("where")
        plain = not any(select.args.get(k) for k in ("where", "group", "order", "joins", "distinct"))
        if plain and not select.find(exp.AggFunc) and not isinstance(select.parent, exp.SetOperation):
            found.add("projection")
        if where is None:
            continue
        for comparison, name in ((exp.EQ, "filter_eq"), (exp.LT, "filter_lt"), (exp.GT, "filter_gt")):
            for node in where.find_all(comparison):
                sides = (node.this, node.expression)
                if any(_is_subquery(side) for side in sides):
                    found.add("scalar_subquery")
                elif any(isinstance(side, exp.Literal) for side in sides):
                    found.add(name)
    for node in tree.find_all(exp.In):
        if node.args.get("query"):
            found.add("not_in_subquery" if isinstance(node.parent, exp.Not) else "in_subquery")
    return found


def test_constructs_reads_the_ast():
    assert constructs("SELECT a FROM t") == {"projection"}
    assert constructs("SELECT a FROM t WHERE b > (SELECT AVG(b) FROM t)") >= {"scalar_subquery", "avg"}
    assert "filter_gt" not in constructs("SELECT a FROM t WHERE b > (SELECT AVG(b) FROM t)")
    assert constructs("SELECT a FROM t WHERE k NOT IN (SELECT k FROM u)") >= {"not_in_subquery", "projection"}
    assert constructs("SELECT T2.a FROM t AS T1 JOIN u AS T2 ON T1.k = T2.k JOIN v AS T3 ON T2.j = T3.j "
                      "WHERE T3.x = 'y'") == {"join_2_hops", "filter_eq"}
    assert constructs("SELECT a FROM t GROUP BY a HAVING COUNT(*) > 2") == {"group_by_having", "count"}
    assert constructs("SELECT COUNT(DISTINCT a) FROM t") == {"count", "distinct"}


def test_human_readable_names():
    assert humanize("order_items") == "order items"
    assert humanize("customerName") == "customer name"
    assert humanize("CustomerID") == "customer id"
    assert humanize("Ref_Shipping_Agents") == "ref shipping agents"
    assert singular("order items") == "order item"
    assert singular("categories") == "category"
    assert singular("addresses") == "address"
    assert singular("status") == "status"
    assert singular("singer") == "singer"
    assert plural("singer") == "singers"
    assert plural("category") == "categories"
    assert plural("order items") == "order items"
    assert plural("class") == "classes"
    assert plural("person") == "people"
    assert plural("units in stock") == "units in stock"
    assert plural("number of seats") == "numbers of seats"


def _construct_counts(pairs: list[dict]) -> Counter:
    counts = Counter()
    for pair in pairs:
        counts.update(constructs(pair["sql"]))
    return counts


def _assert_all_execute(path: Path, pairs: list[dict]) -> None:
    for pair in pairs:
        result = execute_readonly(str(path), pair["sql"], max_rows=5)
        assert result.rows and any(v is not None for row in result.rows for v in row), pair


# --- the demo database at tiny scale (fast) --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_demo") / "demo.sqlite"
    build_demo_database(path, n_customers=40, seed=42)
    return path, introspect(path, "demo")


def test_tiny_demo_covers_every_construct_and_executes(tiny_demo):
    path, schema = tiny_demo
    pairs = generate_pairs(schema, str(path), 240, seed=42)
    assert len(pairs) == 240
    assert len({p["question"].lower() for p in pairs}) == len({p["sql"] for p in pairs}) == 240
    counts = _construct_counts(pairs)
    missing = [name for name in CONSTRUCTS if counts[name] == 0]
    assert not missing, f"constructs never generated: {missing} (counts: {dict(counts)})"
    _assert_all_execute(path, pairs)


def test_deterministic_for_a_seed(tiny_demo):
    path, schema = tiny_demo
    first = generate_pairs(schema, str(path), 80, seed=3)
    assert generate_pairs(schema, str(path), 80, seed=3) == first
    assert generate_pairs(schema, str(path), 80, seed=4) != first


# --- the demo database at its default size (params.yaml: 600 customers, 2,400 pairs) -------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.sqlite"
    build_demo_database(path, n_customers=600, seed=42)
    return path, introspect(path, "demo")


@pytest.fixture(scope="module")
def demo_pairs(demo) -> list[dict]:
    path, schema = demo
    return generate_pairs(schema, str(path), 2400, seed=42)


@pytest.mark.slow
def test_demo_default_size_and_uniqueness(demo_pairs):
    assert len(demo_pairs) >= 2000
    assert all(set(pair) == {"question", "sql"} for pair in demo_pairs)
    assert len({p["question"].lower() for p in demo_pairs}) == len(demo_pairs)
    assert len({p["sql"] for p in demo_pairs}) == len(demo_pairs)
    assert all(p["question"][0].isupper() and p["question"][-1] in ".?" for p in demo_pairs)


@pytest.mark.slow
def test_demo_covers_every_construct(demo_pairs):
    counts = _construct_counts(demo_pairs)
    thin = {name: counts[name] for name in CONSTRUCTS if counts[name] < 40}
    assert not thin, f"constructs with fewer than 40 pairs: {thin} (all counts: {dict(counts)})"


@pytest.mark.slow
def test_demo_pairs_execute_with_results(demo, demo_pairs):
    path, _ = demo
    _assert_all_execute(path, demo_pairs)


@pytest.mark.slow
def test_questions_use_readable_names_and_real_values(demo_pairs):
    questions = " ".join(p["question"] for p in demo_pairs)
    assert "order items" in questions and "order_items" not in questions
    assert "unit price" in questions and "unit_price" not in questions
    # Filter values come from the data (a customer city, an order status).
    assert any("'delivered'" in p["sql"] and "delivered" in p["question"] for p in demo_pairs)


# --- another schema: proves nothing is demo-specific -----------------------------------------------

SCHOOL_DDL = """
CREATE TABLE Teacher (TeacherID INTEGER PRIMARY KEY, FullName TEXT NOT NULL, Subject TEXT NOT NULL,
                      YearsOfService INTEGER NOT NULL);
CREATE TABLE Student (StudentID INTEGER PRIMARY KEY, FullName TEXT NOT NULL, Grade INTEGER NOT NULL,
                      GPA REAL NOT NULL, EnrolledOn DATE NOT NULL,
                      HomeroomTeacherID INTEGER REFERENCES Teacher (TeacherID));
"""


@pytest.fixture(scope="module")
def school(tmp_path_factory):
    path = tmp_path_factory.mktemp("school") / "school.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHOOL_DDL)
    subjects = ["Math", "Biology", "History", "Art", "Physics"]
    first = ["Ada", "Ben", "Cleo", "Dev", "Emil", "Fay", "Gus", "Hana", "Ivo", "June"]
    last = ["Stone", "Marsh", "Ortiz", "Keller", "Ng", "Price"]
    teachers = [(i, f"{first[i % 10]} {last[i % 6]}", subjects[i % 5], 2 + (i * 7) % 25)
                for i in range(1, 13)]
    # Homeroom teachers are 1..10: teachers 11 and 12 have no students, so NOT IN questions have answers.
    students = [(i, f"{first[(i * 3) % 10]} {last[(i * 5) % 6]}", 9 + i % 4,
                 round(2.0 + (i * 37 % 21) / 10, 1), f"202{i % 5}-0{1 + i % 9}-1{i % 10}", 1 + (i * 7) % 10)
                for i in range(1, 121)]
    conn.executemany("INSERT INTO Teacher VALUES (?, ?, ?, ?)", teachers)
    conn.executemany("INSERT INTO Student VALUES (?, ?, ?, ?, ?, ?)", students)
    conn.commit()
    conn.close()
    return path, introspect(path, "school")


def test_other_schema(school):
    path, schema = school
    pairs = generate_pairs(schema, str(path), 300, seed=1)
    assert len(pairs) >= 250
    counts = _construct_counts(pairs)
    # Two tables, one foreign key: everything but two-hop joins is possible.
    missing = [name for name in CONSTRUCTS if name != "join_2_hops" and counts[name] == 0]
    assert not missing, f"constructs never generated on the school schema: {missing}"
    assert counts["join_2_hops"] == 0
    sql_text = " ".join(p["sql"] for p in pairs)
    assert "HomeroomTeacherID" in sql_text
    assert not any(name in sql_text for name in ("customers", "orders", "products"))
    questions = " ".join(p["question"] for p in pairs)
    assert "years of service" in questions and "homeroom teacher" in questions
    _assert_all_execute(path, pairs)


def test_schema_without_usable_columns_is_a_clear_error(tmp_path):
    from pipelines.common.errors import PipelineError

    path = tmp_path / "keys.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE link (a_id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO link VALUES (1)")
    conn.commit()
    conn.close()
    with pytest.raises(PipelineError, match="no table with non-key columns"):
        generate_pairs(introspect(path, "keys"), str(path), 10, seed=0)


# --- a real SpiderMan database ------------------------------------------------------------------------

def test_spiderman_database(shared_datasets, tmp_path):
    from pipelines.ingest import _build_spiderman_database

    path = tmp_path / "store_1.sqlite"
    _build_spiderman_database(shared_datasets / "spiderman" / "databases" / "store_1", path)
    pairs = generate_pairs(introspect(path, "store_1"), str(path), 200, seed=5)
    assert len(pairs) == 200
    counts = _construct_counts(pairs)
    missing = [name for name in CONSTRUCTS if counts[name] == 0]
    assert not missing, f"constructs never generated on store_1: {missing}"
    _assert_all_execute(path, pairs)
