"""Shared generation on a tiny fitted T5: greedy, beam, batching, ONNX Runtime, execution-guided choice."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from conftest import EVAL_PAIRS

from pipelines.common.errors import PipelineError
from pipelines.common.generate import execution_guided, first_executable, generate
from pipelines.common.model_io import load_for_generation
from pipelines.common.onnx_model import load_onnx
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.serialize import serialize, serialize_target


@pytest.fixture(scope="module")
def loaded(eval_workspace):
    model, tokenizer, config = load_for_generation(eval_workspace / "models" / "student", device="cpu")
    schema = SchemaSnapshot.load(eval_workspace / "data" / "ingested" / "schemas" / "shop.json")
    inputs = [serialize(q, schema, config.serialization) for q, _ in EVAL_PAIRS]
    return model, tokenizer, config, inputs


def manual_greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """Greedy decoding written out step by step: argmax of the next-token logits until </s>."""
    encoded = tokenizer([text], return_tensors="pt", return_token_type_ids=False)
    decoded = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(**encoded, decoder_input_ids=decoded).logits[0, -1]
            next_id = int(logits.argmax())
            decoded = torch.cat([decoded, torch.tensor([[next_id]])], dim=1)
            if next_id == tokenizer.eos_token_id:
                break
    return tokenizer.decode(decoded[0], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def test_greedy_is_argmax_decoding_and_fits_the_training_pairs(loaded):
    model, tokenizer, config, inputs = loaded
    greedy = generate(model, tokenizer, inputs, max_new_tokens=32)
    assert all(len(g) == 1 for g in greedy)
    assert [g[0] for g in greedy] == [manual_greedy(model, tokenizer, text, 32) for text in inputs]
    targets = [serialize_target(sql, config.serialization) for _, sql in EVAL_PAIRS]
    assert sum(g[0] == t for g, t in zip(greedy, targets)) >= len(targets) - 1


def test_batching_keeps_input_order_and_results(loaded):
    model, tokenizer, _, inputs = loaded
    one_by_one = [generate(model, tokenizer, [text], max_new_tokens=32, batch_size=1)[0] for text in inputs]
    # Mixed lengths in batches of 4: sorted by length internally, returned in the caller's order.
    assert generate(model, tokenizer, inputs[::-1], max_new_tokens=32, batch_size=4) == one_by_one[::-1]


def test_beam_search_returns_distinct_candidates_best_first(loaded):
    model, tokenizer, _, inputs = loaded
    greedy = generate(model, tokenizer, inputs, max_new_tokens=32)
    beams = generate(model, tokenizer, inputs, num_beams=3, num_return_sequences=3, max_new_tokens=32)
    assert all(len(b) == 3 and len(set(b)) == 3 for b in beams)
    # On a model this sure of its answers the best beam is the greedy answer.
    assert [b[0] for b in beams] == [g[0] for g in greedy]
    top_only = generate(model, tokenizer, inputs, num_beams=3, max_new_tokens=32)
    assert [t[0] for t in top_only] == [b[0] for b in beams]
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, tokenizer, inputs, num_beams=2, num_return_sequences=3, max_new_tokens=8)
    assert generate(model, tokenizer, [], max_new_tokens=8) == []


def test_onnx_runtime_model_generates_the_same(loaded, eval_onnx):
    """The ONNX Runtime search (pipelines.common.search) against transformers' generate on the PyTorch
    model: the same greedy answers and the same beams in the same order, batched with padding."""
    model, tokenizer, _, inputs = loaded
    onnx_model = load_onnx(eval_onnx, device="cpu")
    for options in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=3), dict(num_beams=4)):
        expected = generate(model, tokenizer, inputs, max_new_tokens=32, batch_size=4, **options)
        assert generate(onnx_model, tokenizer, inputs, max_new_tokens=32, batch_size=4, **options) == expected
    # Cut short by max_new_tokens, before any hypothesis ended.
    assert (generate(onnx_model, tokenizer, inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2)
            == generate(model, tokenizer, inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2))


def test_execution_guided_picks_the_first_executable_beam(eval_workspace):
    db = eval_workspace / "data" / "ingested" / "databases" / "shop.sqlite"
    candidates = ["selec name from customers", "select nme from customers", "delete from customers",
                  "select name from customers", "select city from customers"]
    assert first_executable(candidates, db, timeout_s=2) == 3
    assert execution_guided(candidates, db, timeout_s=2) == "select name from customers"
    assert execution_guided(["select nope", "drop table orders"], db, timeout_s=2) == "select nope"
    assert sqlite3.connect(db).execute("SELECT count(*) FROM customers").fetchone() == (3,)
    with pytest.raises(ValueError):
        execution_guided([], db, timeout_s=2)


def test_load_for_generation_errors_name_the_problem(tmp_path, eval_workspace):
    with pytest.raises(PipelineError, match="not found"):
        load_for_generation(tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="missing .*weights.*serialization.json"):
        load_for_generation(incomplete)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "encoder_model.onnx").write_bytes(b"")
    with pytest.raises(PipelineError, match="incomplete ONNX export"):
        load_for_generation(onnx_dir)
