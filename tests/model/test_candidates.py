"""Answer candidates: known examples' SQL first, then the model's beams."""

from __future__ import annotations

import pytest
from conftest import EVAL_PAIRS

from pipelines.common.candidates import answer_candidates, with_examples
from pipelines.common.model_io import load_for_generation
from pipelines.common.retrieval import BankExample
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.serialize import serialize

NEAR = [BankExample(db_id="shop", question="q", sql="select max ( amount ) from orders"),
        BankExample(db_id="shop", question="q", sql="select count ( * ) from customers"),
        BankExample(db_id="shop", question="q", sql="select max(amount) from orders")]


def test_examples_come_first_tidied_and_once_then_the_other_beams():
    found = with_examples(["select count(*) from customers", "select name from customers"], NEAR)
    # Bank SQL is the spaced target text: it is tidied, and one query spelled twice is tried once.
    assert found.candidates == ["select max(amount) from orders", "select count(*) from customers",
                                "select name from customers"]
    assert found.origins == ["example", "example", "model"]
    assert found.beams == ["select count(*) from customers", "select name from customers"]
    assert with_examples(["b1", "b2"], []).candidates == ["b1", "b2"]


@pytest.fixture(scope="module")
def loaded(eval_workspace):
    model, tokenizer, config = load_for_generation(eval_workspace / "models" / "student", device="cpu")
    schema = SchemaSnapshot.load(eval_workspace / "data" / "ingested" / "schemas" / "shop.json")
    return model, tokenizer, config, [serialize(q, schema, config.serialization) for q, _ in EVAL_PAIRS]


def test_answer_candidates_keeps_the_beams_beside_the_examples(loaded):
    model, tokenizer, config, inputs = loaded
    near = [[BankExample(db_id="shop", question="q", sql="select sum ( amount ) from orders")]] * 2
    found = answer_candidates(model, tokenizer, config, inputs[:2], near, num_beams=2, example_candidates=1,
                              max_new_tokens=24)
    beams_only = answer_candidates(model, tokenizer, config, inputs[:2], near, num_beams=2, example_candidates=0,
                                   max_new_tokens=24)
    for with_example, without in zip(found, beams_only):
        assert with_example.beams == without.beams == without.candidates
        assert with_example.candidates[0] == "select sum(amount) from orders"
        assert with_example.origins[0] == "example" and without.origins == ["model", "model"]
