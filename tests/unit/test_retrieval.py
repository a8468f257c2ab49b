"""Retrieval of similar training examples and its place in the model input."""

from __future__ import annotations

from conftest import TINY_SCHEMAS

from pipelines.common.params import SerializationParams
from pipelines.common.retrieval import BankExample, ExampleBank
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.serialize import SerializationConfig, serialize

SHOP = SchemaSnapshot.model_validate(TINY_SCHEMAS["shop"])
BANK = [
    BankExample(db_id="shop", question="How many customers are there?", sql="select count(*) from customers"),
    BankExample(db_id="shop", question="List the names of customers living in Paris.",
                sql="select name from customers where city = 'Paris'"),
    BankExample(db_id="shop", question="What is the total amount of all orders?", sql="select sum(amount) from orders"),
    BankExample(db_id="zoo", question="How many customers does the zoo have?", sql="select count(*) from visitors"),
]


def test_nearest_finds_the_paraphrase_within_the_same_database_only():
    bank = ExampleBank(BANK)
    best = bank.nearest("How many customers do we have?", "shop", k=1)
    assert [e.sql for e in best] == ["select count(*) from customers"]
    assert [e.sql for e in bank.nearest("names of the customers in Lyon", "shop", k=2)][0] == (
        "select name from customers where city = 'Paris'")
    assert all(e.db_id == "zoo" for e in bank.nearest("How many customers?", "zoo", k=3))
    assert bank.nearest("How many customers?", "unknown_db", k=3) == []


def test_an_example_is_not_its_own_neighbour():
    bank = ExampleBank(BANK)
    assert bank.nearest(BANK[0].question, "shop", k=1)[0] == BANK[0]
    assert BANK[0] not in bank.nearest(BANK[0].question, "shop", k=3, exclude=0)


def test_config_retrieves_only_when_switched_on():
    on = SerializationConfig(serialization=SerializationParams(retrieval_k=2), max_source_length=64,
                             max_target_length=32, model_base="scratch", examples=BANK)
    off = on.model_copy(update={"serialization": SerializationParams(retrieval_k=0)})
    assert len(on.similar("how many customers", "shop")) == 2
    assert off.similar("how many customers", "shop") == []
    assert on.similar("how many customers", None) == []
    # The bank round-trips through serialization.json with the model; using it changes no comparison.
    assert SerializationConfig.model_validate_json(on.model_dump_json()) == on


def test_similar_examples_come_after_the_question_and_survive_truncation():
    cfg = SerializationParams(retrieval_k=1)
    near = [BANK[1]]
    text = serialize("Names of customers in Nice?", SHOP, cfg, similar=near)
    assert text.startswith("question: names of customers in nice? | similar: list the names of customers living "
                           "in paris. => select name from customers where city = 'Paris' | schema: customers:")
    short = serialize("Names of customers in Nice?", SHOP, cfg, similar=near, max_tokens=30,
                      count_tokens=lambda t: len(t.split()))
    assert "=> select name from customers where city = 'Paris'" in short
    assert len(short) < len(text)


def test_sentence_embeddings_match_paraphrases_that_share_few_words():
    bank = [BankExample(db_id="uni", question="What is the total number of faculty members?",
                        sql="select count(*) from faculty"),
            BankExample(db_id="uni", question="Which faculty members teach the most courses?",
                        sql="select fname from faculty order by courses desc limit 1"),
            BankExample(db_id="uni", question="How many students do we have?", sql="select count(*) from student")]
    minilm = ExampleBank(bank, encoder="minilm")
    assert minilm.nearest("How many faculty are there?", "uni", k=1)[0].sql == "select count(*) from faculty"
    both = minilm.nearest_batch(["How many faculty are there?", "count the students"], ["uni", "uni"], k=1,
                                excludes=[0, None])
    assert [near[0] for near in both] == [bank[1], bank[2]]  # the first may not retrieve bank[0]
    assert minilm.nearest_batch(["anything"], [None], k=1) == [[]]


def test_examples_added_later_are_retrieved_like_the_first_ones():
    for encoder in ("tfidf", "minilm"):
        bank = ExampleBank(BANK[:3], encoder=encoder)
        assert bank.nearest("How many visitors does the zoo have?", "zoo", k=1) == []
        bank.prepare()
        bank.add(BANK[3:])
        assert bank.has_database("zoo")
        assert bank.nearest("How many visitors does the zoo have?", "zoo", k=2) == [BANK[3]]
        assert bank.nearest("How many customers do we have?", "shop", k=1) == [BANK[0]]


def _shop_database(path):
    import sqlite3

    from pipelines.common.schema import introspect

    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER)")
        connection.executemany("INSERT INTO customers (name, city, age) VALUES (?, ?, ?)",
                               [(f"name{i}", ["Paris", "Lyon", "Nice"][i % 3], 20 + i) for i in range(30)])
    return introspect(str(path), "new_shop", 0)


def test_a_database_without_examples_retrieves_pairs_generated_from_its_own_rows(tmp_path):
    schema = _shop_database(tmp_path / "new_shop.sqlite")
    config = SerializationConfig(serialization=SerializationParams(retrieval_k=2, unseen_db_examples=40),
                                 max_source_length=64, max_target_length=32, model_base="scratch", examples=BANK)
    saved = config.model_dump()
    assert config.similar("how many customers are there?", "new_shop") == []
    config.cover_databases({"new_shop": schema, "shop": SHOP}, {"new_shop": str(tmp_path / "new_shop.sqlite"),
                                                                 "shop": None})
    near = config.similar("How many customers live in Paris?", "new_shop")
    assert len(near) == 2 and all(e.db_id == "new_shop" and "customers" in e.sql for e in near)
    assert config.similar("How many customers are there?", "shop")[0] == BANK[0]  # its own examples only
    assert config.model_dump() == saved  # generated examples are not saved with the model
    # Switched off: nothing is generated.
    off = SerializationConfig(serialization=SerializationParams(retrieval_k=2), max_source_length=64,
                              max_target_length=32, model_base="scratch", examples=BANK)
    off.cover_databases({"new_shop": schema}, {"new_shop": str(tmp_path / "new_shop.sqlite")})
    assert off.similar("How many customers live in Paris?", "new_shop") == []


def test_literal_weight_prefers_the_example_whose_values_the_question_names():
    from pipelines.common.retrieval import literal_agreement, sql_literals

    assert sql_literals("select name from t where city = 'Paris' and age > 30 limit 1") == ["paris", "30", "1"]
    assert literal_agreement("customers in paris older than 30", ["paris", "30"]) == 1.0
    assert literal_agreement("customers in paris older than 40", ["paris", "30"]) == 0.5
    assert literal_agreement("customers in lyon", ["paris"]) == 0.0
    assert literal_agreement("how many customers", []) == 0.0
    bank = [BankExample(db_id="shop", question="Which customers live in Paris?",
                        sql="select name from customers where city = 'Paris'"),
            BankExample(db_id="shop", question="Which customers live in Lyon?",
                        sql="select name from customers where city = 'Lyon'")]
    question = "Names of the customers whose city is Lyon"
    for encoder in ("tfidf", "minilm"):
        assert ExampleBank(bank, encoder, literal_weight=1.0).nearest(question, "shop", k=1) == [bank[1]]
