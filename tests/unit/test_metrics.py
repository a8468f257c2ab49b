"""Execution accuracy, exact-set match and Spider hardness on hand-made cases and known Spider queries."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pipelines.common import metrics as m


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "singers.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript("""
            CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country TEXT, net REAL);
            INSERT INTO singer VALUES (1, 'Ann', 30, 'France', 1.0), (2, 'Bob', 25, 'France', 2.5),
                                      (3, 'Cid', 41, 'Spain', 2.5), (4, 'Dee', 25, 'Peru', 0.1);
            CREATE TABLE song (id INTEGER PRIMARY KEY, singer_id INTEGER REFERENCES singer(id), title TEXT);
            INSERT INTO song VALUES (1, 1, 'A'), (2, 1, 'B'), (3, 3, 'C');
        """)
    connection.close()
    return str(path)


def verdict(db, predicted, gold):
    return m.execution_match(predicted, gold, db, timeout_s=2.0, max_rows=100)


# --- execution accuracy ----------------------------------------------------------------------------

def test_same_rows_in_another_order_match_without_order_by(db):
    assert verdict(db, "SELECT name FROM singer ORDER BY name DESC", "SELECT name FROM singer") == m.CORRECT


def test_row_order_matters_when_gold_has_top_level_order_by(db):
    gold = "SELECT name FROM singer ORDER BY age, name"
    assert verdict(db, "SELECT name FROM singer ORDER BY age, name", gold) == m.CORRECT
    assert verdict(db, "SELECT name FROM singer ORDER BY name", gold) == m.WRONG
    # An ORDER BY only inside a subquery does not make the outer result ordered.
    assert verdict(db, "SELECT name FROM singer",
                   "SELECT name FROM (SELECT name FROM singer ORDER BY age)") == m.CORRECT


def test_duplicates_count_as_a_multiset(db):
    gold = "SELECT age FROM singer"  # 30, 25, 41, 25
    assert verdict(db, "SELECT DISTINCT age FROM singer", gold) == m.WRONG
    assert verdict(db, "SELECT age FROM singer WHERE id != 4 UNION ALL SELECT 25", gold) == m.CORRECT


def test_int_and_float_values_are_equal(db):
    assert verdict(db, "SELECT 1.0, 2.50", "SELECT 1, 2.5") == m.CORRECT
    assert verdict(db, "SELECT count(*) * 1.0 FROM singer", "SELECT count(*) FROM singer") == m.CORRECT
    # float noise is rounded away, real differences are not
    assert verdict(db, "SELECT 0.1 + 0.2", "SELECT 0.3") == m.CORRECT
    assert verdict(db, "SELECT 0.31", "SELECT 0.3") == m.WRONG


def test_column_order_is_ignored_but_column_count_is_not(db):
    assert verdict(db, "SELECT age, name FROM singer", "SELECT name, age FROM singer") == m.CORRECT
    assert verdict(db, "SELECT name, age, id FROM singer", "SELECT name, age FROM singer") == m.WRONG
    # Same column multisets, but the row pairing differs: no permutation makes them equal.
    assert m.results_match([(1, "a"), (2, "b")], [(1, "b"), (2, "a")], ordered=False) is False


def test_prediction_errors_are_wrong_and_gold_errors_are_excluded(db):
    gold = "SELECT name FROM singer"
    assert verdict(db, "SELECT nme FROM singer", gold) == m.PRED_ERROR
    assert verdict(db, "SELEC name FROM singer", gold) == m.PRED_ERROR
    assert verdict(db, "DELETE FROM singer", gold) == m.PRED_ERROR
    assert verdict(db, "SELECT name FROM singer; DROP TABLE singer", gold) == m.PRED_ERROR
    assert verdict(db, "SELECT name FROM singer", "SELECT name FROM missing_table") == m.GOLD_ERROR
    assert sqlite3.connect(db).execute("SELECT count(*) FROM singer").fetchone() == (4,)


def test_timeout_counts_as_prediction_error(db):
    slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) "
            "SELECT count(*) FROM n")
    assert m.execution_match(slow, "SELECT 1", db, timeout_s=0.2, max_rows=10) == m.PRED_ERROR


def test_empty_results_match_and_truncation_must_agree(db):
    nothing, nothing_else = "SELECT name FROM singer WHERE age > 99", "SELECT id FROM song WHERE id > 99"
    assert verdict(db, nothing, nothing_else) == m.CORRECT
    assert m.execution_match("SELECT id FROM singer", "SELECT id FROM singer WHERE id < 3", db,
                             timeout_s=2, max_rows=2) == m.WRONG


def test_valid_sql_means_parses_and_executes(db):
    assert m.is_valid_sql(m.run_query(db, "SELECT name FROM singer", timeout_s=2, max_rows=10))
    assert not m.is_valid_sql(m.run_query(db, "SELECT nope FROM singer", timeout_s=2, max_rows=10))
    assert not m.is_valid_sql(m.run_query(db, "not sql at all", timeout_s=2, max_rows=10))


# --- exact-set match -------------------------------------------------------------------------------

@pytest.mark.parametrize("predicted, gold", [
    # aliases, case, conjunct order, mirrored comparison, values
    (("SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id "
      "WHERE T2.title = 'A' AND T1.age < 30"),
     ("select singer.name from song join singer on singer.id = song.singer_id "
      "where 40 > singer.age and song.title = 'B'")),
    ("SELECT name, age FROM singer", "SELECT age, name FROM singer"),
    ("SELECT name FROM singer", "SELECT T1.name FROM singer AS T1"),
    ("SELECT count(*) AS c, country FROM singer GROUP BY country ORDER BY c DESC LIMIT 1",
     "SELECT country, COUNT(*) FROM singer GROUP BY country ORDER BY count(*) DESC LIMIT 3"),
    ("SELECT name FROM singer WHERE id IN (SELECT singer_id FROM song WHERE title = 'A')",
     "SELECT name FROM singer WHERE id IN (SELECT T.singer_id FROM song AS T WHERE T.title = 'C')"),
    ("SELECT name FROM singer UNION SELECT title FROM song",
     "SELECT title FROM song UNION SELECT name FROM singer"),
])
def test_exact_set_match_equal(predicted, gold):
    assert m.exact_set_match(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("SELECT name FROM singer ORDER BY age, name", "SELECT name FROM singer ORDER BY name, age"),
    ("SELECT name FROM singer ORDER BY age", "SELECT name FROM singer ORDER BY age DESC"),
    ("SELECT name FROM singer WHERE id IN (SELECT singer_id FROM song)",
     "SELECT name FROM singer WHERE id NOT IN (SELECT singer_id FROM song)"),
    ("SELECT name FROM singer EXCEPT SELECT title FROM song",
     "SELECT title FROM song EXCEPT SELECT name FROM singer"),
    ("SELECT name FROM singer WHERE age > 3", "SELECT name FROM singer WHERE age >= 3"),
    ("SELECT DISTINCT name FROM singer", "SELECT name FROM singer"),
    ("SELECT name FROM singer", "SELECT name FROM singer LIMIT 1"),
    ("SELECT name FROM", "SELECT name FROM singer"),
])
def test_exact_set_match_different(predicted, gold):
    assert not m.exact_set_match(predicted, gold)


def test_exact_match_values_optional_and_schema_resolves_unqualified_columns():
    assert m.exact_set_match("SELECT name FROM singer WHERE age = 1", "SELECT name FROM singer WHERE age = 2")
    one, two = "SELECT name FROM singer WHERE age = 1", "SELECT name FROM singer WHERE age = 2"
    assert not m.exact_set_match(one, two, with_values=True)
    joined, qualified = ("SELECT name, title FROM singer JOIN song ON singer.id = song.singer_id",
                         "SELECT T1.name, T2.title FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id")
    assert not m.exact_set_match(joined, qualified)  # without a schema `name` could belong to either table
    schema = {"singer": ["id", "name", "age"], "song": ["id", "singer_id", "title"]}
    assert m.exact_set_match(joined, qualified, schema=schema)


# --- Spider hardness -------------------------------------------------------------------------------

@pytest.mark.parametrize("sql, counts, level", [
    # Counts worked out by hand with Spider's rules: (component1, component2, others).
    ("SELECT count(*) FROM head WHERE age > 56", (1, 0, 0), "easy"),
    ("SELECT name, born_state, age FROM head ORDER BY age", (1, 0, 1), "medium"),
    ("SELECT max(budget_in_billions), min(budget_in_billions) FROM department", (0, 0, 2), "medium"),
    ("SELECT advisor, count(*) FROM Student GROUP BY advisor", (1, 0, 1), "medium"),
    ("SELECT amount FROM payment ORDER BY amount DESC LIMIT 1", (2, 0, 0), "medium"),
    (("SELECT Status FROM city WHERE Population > 1500 "
      "INTERSECT SELECT Status FROM city WHERE Population < 500"),
     (1, 1, 0), "hard"),
    # join (+1), where (+1), like (+1), or (+1); 2 select columns, 2 where conditions
    ("SELECT T1.a, T2.b FROM x AS T1 JOIN y AS T2 ON T1.id = T2.id WHERE T1.c LIKE '%q%' OR T2.d = 1",
     (4, 0, 2), "extra"),
    # a subquery in a condition is nested (component2)
    ("SELECT name FROM singer WHERE id NOT IN (SELECT singer_id FROM song)", (1, 1, 0), "hard"),
    ("SELECT name FROM singer WHERE id IN (SELECT singer_id FROM song) AND age > 3", (1, 1, 1), "extra"),
    # Spider's count_agg counts the NOT flag of a WHERE condition as an aggregate: count(*) + NOT = 2
    ("SELECT count(*) FROM singer WHERE id NOT IN (1, 2)", (1, 0, 1), "medium"),
    ("SELECT count(*) FROM singer WHERE id IN (1, 2)", (1, 0, 0), "easy"),
])
def test_hardness_hand_checked(sql, counts, level):
    assert m.hardness_counts(sql) == counts
    assert m.hardness(sql) == level


def test_hardness_on_spider_training_queries(shared_datasets):
    examples = json.loads((shared_datasets / "spider" / "train_spider.json").read_text())
    by_query = {e["query"]: e for e in examples}
    hand_checked = {
        # no WHERE/GROUP/ORDER, one aggregate, one column
        "SELECT count(*) FROM head WHERE age  >  56": "easy",
        # three select columns -> others = 1
        "SELECT creation ,  name ,  budget_in_billions FROM department": "medium",
        # UNION -> component2 = 1 with nothing else
        "SELECT student_id FROM student_course_registrations UNION SELECT student_id FROM "
        "student_course_attendance": "hard",
    }
    for query, level in hand_checked.items():
        assert query in by_query, query
        assert m.hardness(query) == level
    sample = examples[::10]  # every 10th query keeps the test to a second or two
    levels = [m.hardness(e["query"]) for e in sample]
    share = {lvl: levels.count(lvl) / len(levels) for lvl in m.HARDNESS_LEVELS}
    # Every query is classified, and each level is well represented, as in Spider's published splits.
    assert len(levels) == 700
    assert all(0.1 < share[lvl] < 0.5 for lvl in m.HARDNESS_LEVELS), share
