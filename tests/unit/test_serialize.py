"""Serialization of (question, schema) into model inputs: format, case rule, truncation policy, config file."""

from __future__ import annotations

import json

import pytest

from pipelines.common.errors import PipelineError
from pipelines.common.params import SerializationParams
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.serialize import (
    SerializationConfig,
    coarse_type,
    load_config,
    lowercase_outside_quotes,
    save_config,
    serialize,
    serialize_target,
)
from conftest import TINY_SCHEMAS

SHOP = SchemaSnapshot.model_validate(TINY_SCHEMAS["shop"])


def words(text: str) -> int:
    return len(text.split())


def test_format_with_types_keys_and_foreign_keys():
    text = serialize("How many Customers?", SHOP, SerializationParams())
    assert text == (
        "question: how many customers? | schema: customers: customer_id (number, pk), name (text), "
        "city (text) ; orders: order_id (number, pk), customer_id (number), amount (number), ordered_on (time)"
        " | fk: orders.customer_id = customers.customer_id"
    )


def test_without_types_and_keys_and_case_kept():
    cfg = SerializationParams(include_types=False, include_keys=False, lowercase=False)
    text = serialize("How many Customers?", SHOP, cfg)
    assert text.startswith("question: How many Customers? | schema: customers: customer_id, name, city ; orders:")
    assert "fk:" not in text and "pk" not in text


def test_sample_values_keep_their_case_when_lowercasing():
    text = serialize("Customers in PARIS", SHOP, SerializationParams(sample_values=2))
    assert "question: customers in paris" in text
    assert "name (text, values: Alice / Bob)" in text
    assert "city (text, values: Paris / Lyon)" in text


def test_lowercase_keeps_quoted_literals_and_apostrophes():
    sql = "SELECT Name FROM Customers WHERE City = 'New York' AND note = \"O''K\" AND n = 'it''s'"
    assert lowercase_outside_quotes(sql) == (
        "select name from customers where city = 'New York' and note = \"O''K\" and n = 'it''s'"
    )
    # An apostrophe inside a word does not open a quoted span.
    assert lowercase_outside_quotes("What's the Customers' NAME in 'Oslo'?") == "what's the customers' name in 'Oslo'?"
    assert serialize_target("SELECT  COUNT(*)\nFROM T WHERE a='X'", SerializationParams()) == (
        "select count(*) from t where a='X'"
    )
    assert serialize_target("SELECT A FROM T", SerializationParams(lowercase=False)) == "SELECT A FROM T"


def test_coarse_types():
    assert [coarse_type(t) for t in ("INTEGER", "varchar(20)", "DATETIME", "BOOLEAN", "DECIMAL(10,2)", "", None)] == [
        "number", "text", "time", "boolean", "number", "others", "others"
    ]


def test_truncation_drops_samples_first_then_unmatched_tables_and_never_cuts_the_question():
    cfg = SerializationParams(sample_values=3)
    question = "What is the total amount of orders"
    full = serialize(question, SHOP, cfg)
    # Budget that fits the text once sample values are gone, but not with them.
    no_samples = serialize(question, SHOP, SerializationParams(sample_values=0))
    shortened = serialize(question, SHOP, cfg, max_tokens=words(no_samples), count_tokens=words)
    assert words(full) > words(no_samples)
    assert shortened == no_samples

    tight = serialize(question, SHOP, cfg, max_tokens=words(no_samples) - 8, count_tokens=words)
    assert words(tight) <= words(no_samples) - 8
    assert tight.startswith(f"question: {question.lower()} | schema: ")
    # `orders` and `amount` overlap the question; the unmatched `customers` columns go first.
    assert "orders: order_id (number, pk), customer_id (number), amount (number)" in tight
    assert "city" not in tight and "name (text)" not in tight


def test_truncation_drops_whole_unmatched_table_before_matched_columns():
    cfg = SerializationParams(include_types=False)
    question = "amount of each order"
    tight = serialize(question, SHOP, cfg, max_tokens=12, count_tokens=words)
    assert "customers" not in tight.split("| schema:")[1]
    assert "amount" in tight
    # fk pointing at a dropped table is not listed.
    assert "fk:" not in tight


def test_question_is_kept_whole_even_when_nothing_fits():
    question = "a very long question " * 10
    text = serialize(question, SHOP, SerializationParams(), max_tokens=5, count_tokens=words)
    assert text.startswith("question: " + " ".join(question.split()))


def test_config_round_trip_and_clear_errors(tmp_path):
    config = SerializationConfig(
        serialization=SerializationParams(sample_values=2), max_source_length=128, max_target_length=64,
        model_base="scratch",
    )
    path = save_config(tmp_path, config)
    assert json.loads(path.read_text())["max_source_length"] == 128
    assert load_config(tmp_path) == config

    path.write_text(json.dumps({**config.model_dump(), "max_source_length": "many"}))
    with pytest.raises(PipelineError, match=r"serialization\.json: invalid serialization config: max_source_length"):
        load_config(tmp_path)
    path.write_text(json.dumps({**config.model_dump(), "format_version": 99}))
    with pytest.raises(PipelineError, match="format_version 99"):
        load_config(tmp_path)
    with pytest.raises(PipelineError, match="file not found"):
        load_config(tmp_path / "missing")


def test_spaced_sql_is_still_the_same_query_and_tidies_back():
    import sqlite3

    from pipelines.common.serialize import space_sql, tidy_sql

    sql = ("SELECT T1.name, count(*) FROM shop AS T1 JOIN orders AS T2 ON T1.id = T2.shop_id "
           "WHERE T1.city = 'St. Louis (MO)' AND T2.amount > 4.5 AND T1.id IN (SELECT max(id) FROM shop) "
           "GROUP BY T1.name")
    spaced = space_sql(sql)
    assert "T1 . name" in spaced and "count ( * )" in spaced and "4.5" in spaced
    assert "'St. Louis (MO)'" in spaced  # literals untouched
    assert tidy_sql(spaced) == sql
    db = sqlite3.connect(":memory:")
    db.executescript("CREATE TABLE shop (id INT, name TEXT, city TEXT); CREATE TABLE orders (shop_id INT, amount REAL);"
                     "INSERT INTO shop VALUES (1, 'a', 'St. Louis (MO)'); INSERT INTO orders VALUES (1, 9.0);")
    assert db.execute(spaced).fetchall() == db.execute(sql).fetchall() == [("a", 1)]


def test_split_punctuation_spaces_the_target():
    on = SerializationParams(split_punctuation=True)
    assert serialize_target("SELECT T1.Name FROM Shop AS T1 WHERE T1.City = 'Nice'", on) == (
        "select t1 . name from shop as t1 where t1 . city = 'Nice'")
    assert serialize_target("SELECT count(*) FROM shop", SerializationParams()) == "select count(*) from shop"
