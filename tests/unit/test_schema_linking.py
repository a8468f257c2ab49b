"""Schema linking: name and value matches, the linked serialization, pruning, and the database value index."""

from __future__ import annotations

import sqlite3

from pipelines.common.params import SerializationParams
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.schema_linking import (
    build_value_index,
    identifier_words,
    link_schema,
    name_score,
    value_index_for,
)
from pipelines.common.serialize import SerializationConfig, serialize
from conftest import TINY_SCHEMAS

SHOP = SchemaSnapshot.model_validate(TINY_SCHEMAS["shop"])
LINKED = SerializationParams(schema_linking=True)


def test_identifier_words_split_snake_and_camel_case_and_fold_plurals():
    assert identifier_words("order_items") == ["order", "item"]
    assert identifier_words("OrderItems") == ["order", "item"]
    assert identifier_words("orderItemID") == ["order", "item", "id"]
    assert identifier_words("Cities") == ["city"]


def test_exact_phrase_beats_partial_and_generic_words_alone_do_not_match():
    question = identifier_words("which order items were shipped")
    assert name_score("order_items", question) == 1.0
    assert name_score("item_price", question) == 0.25  # "item" of {item, price}
    assert name_score("type_id", question) == 0.0  # only generic words


def test_values_link_their_column_and_table():
    links = link_schema("How many orders did customers in Paris place?", SHOP)
    assert links.column_values("customers", "city") == ["Paris"]
    assert links.column_score("customers", "city") == 1.0
    assert links.table_score("customers") > links.table_score("orders") > 0
    # Values from a database index count like snapshot samples; short numbers never link.
    links = link_schema("orders from Bordeaux worth 2", SHOP, {"customers": {"city": ["Bordeaux", "Nice"]}})
    assert links.column_values("customers", "city") == ["Bordeaux"]
    assert links.column_values("orders", "amount") == []


def test_linked_text_puts_marked_items_first_with_values_as_literals():
    text = serialize("Names of customers living in Lyon", SHOP, LINKED)
    assert text.startswith("question: names of customers living in lyon | schema: *customers: ")
    assert "*city (text, = 'Lyon')" in text
    assert text.index("*customers") < text.index("orders:")
    # The literal keeps its case and its quotes are doubled, as the SQL must write it.
    text = serialize("customers called O'Hara", SHOP, LINKED)
    assert "*name (text, = 'O''Hara')" in text


def test_switch_off_is_byte_identical_to_the_plain_format():
    question = "Names of customers living in Lyon"
    plain = serialize(question, SHOP, SerializationParams())
    assert serialize(question, SHOP, SerializationParams(linking_max_tables=1, linking_max_columns=0)) == plain
    assert "*" not in plain


def test_pruning_keeps_matched_items_keys_and_foreign_key_columns():
    cfg = SerializationParams(schema_linking=True, linking_max_tables=1, linking_max_columns=0)
    text = serialize("which city do customers live in", SHOP, cfg)
    assert "orders" not in text
    assert "*city" in text and "customer_id" in text  # the key stays for joins
    assert "name" not in text.split("|")[1]  # unmatched non-key column pruned
    full = serialize("which city do customers live in", SHOP, LINKED)
    assert len(text) < len(full)


def test_truncation_still_applies_on_top_of_linking():
    text = serialize("amount of orders in Paris", SHOP, LINKED, max_tokens=20, count_tokens=lambda t: len(t.split()))
    assert "*city (text, = 'Paris')" in text or "*amount" in text
    assert len(text.split()) < len(serialize("amount of orders in Paris", SHOP, LINKED).split())


def test_serialization_config_carries_the_linking_options_and_old_configs_load_as_off():
    config = SerializationConfig(serialization=LINKED, max_source_length=64, max_target_length=32,
                                 model_base="scratch")
    dumped = config.model_dump()
    assert dumped["serialization"]["schema_linking"] is True
    del dumped["serialization"]["schema_linking"], dumped["serialization"]["linking_values"]
    assert SerializationConfig.model_validate(dumped).serialization.schema_linking is False


def test_value_index_reads_the_most_frequent_text_values_read_only(tmp_path):
    path = tmp_path / "shop.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, city VARCHAR(40))")
        connection.executemany("INSERT INTO customers (name, city) VALUES (?, ?)",
                               [("Ann", "Nantes"), ("Bea", "Nantes"), ("Cy", "Metz"), ("Di", None)])
    schema = SchemaSnapshot.model_validate({"db_id": "shop", "tables": [{"name": "customers", "columns": [
        {"name": "customer_id", "type": "INTEGER", "primary_key": True},
        {"name": "name", "type": "TEXT"}, {"name": "city", "type": "VARCHAR(40)"}]}]})
    index = build_value_index(str(path), schema, per_column=1)
    assert index == {"customers": {"name": ["Ann"], "city": ["Nantes"]}}
    assert value_index_for(str(path), schema, 5)["customers"]["city"] == ["Nantes", "Metz"]
    text = serialize("customers in metz", schema, LINKED, value_index=value_index_for(str(path), schema, 5))
    assert "*city (text, = 'Metz')" in text


def test_tokenize_builds_value_indexes_only_when_linking_is_on(workspace):
    from pipelines.common.databases import resolve, write_index
    from pipelines.tokenize import linking_value_indexes

    (workspace / "data/ingested/databases").mkdir(parents=True)
    with sqlite3.connect(workspace / "data/ingested/databases/shop.sqlite") as connection:
        connection.execute("CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, city VARCHAR(40))")
        connection.execute("INSERT INTO customers (name, city) VALUES ('Ann', 'Rennes')")
        connection.execute("CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL, "
                           "ordered_on DATE)")
    write_index({"shop": "databases/shop.sqlite"}, workspace / "data/ingested/databases.json")
    targets = {"shop": resolve("shop", workspace / "data/ingested/databases.json")}
    assert linking_value_indexes({"shop": SHOP}, targets, SerializationParams()) == {}
    indexes = linking_value_indexes({"shop": SHOP}, targets, LINKED)
    assert indexes["shop"]["customers"]["city"] == ["Rennes"]
    assert "*city (text, = 'Rennes')" in serialize("orders from Rennes", SHOP, LINKED, value_index=indexes["shop"])
