"""A real, tiny NL-to-SQL model for serving tests, built in seconds: a word-level tokenizer and a one-layer
T5 trained to answer "names" questions with `select name from customers` and "erase" questions with
`delete from customers` (so the service's refusal of non-SELECT output can be exercised), exported to
ONNX by the export stage's own code."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from pipelines import export
from pipelines.common.params import SerializationParams
from pipelines.common.schema import SchemaSnapshot, introspect
from pipelines.common.serialize import SerializationConfig, save_config, serialize, serialize_target

SELECT_QUESTIONS = ["list customer names", "show the names of all customers", "what are the customer names?",
                    "names of customers", "give me every name"]
ERASE_QUESTIONS = ["erase every customer", "erase the customers", "please erase all"]
SELECT_SQL = "SELECT name FROM customers"
ERASE_SQL = "DELETE FROM customers"
CUSTOMERS = [(1, "Ada", "Paris"), (2, "Bob", "Lyon"), (3, "Cy", "Paris"), (4, "Dee", "Nice"), (5, "Eve", "Paris")]


def build_database(path: Path) -> SchemaSnapshot:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT)")
        connection.executemany("INSERT INTO customers VALUES (?, ?, ?)", CUSTOMERS)
    return introspect(str(path), "shop", 0)


TINY_T5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)


def build_onnx_model(schema: SchemaSnapshot, work: Path, output: Path, steps: int = 150,
                     t5: dict | None = None) -> Path:
    """Train (a few seconds) and export; `t5` overrides the T5 size (default TINY_T5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    torch.set_num_threads(1)
    options = SerializationParams()
    pairs = [(q, SELECT_SQL) for q in SELECT_QUESTIONS] + [(q, ERASE_SQL) for q in ERASE_QUESTIONS]
    sources = [serialize(q, schema, options) for q, _ in pairs]
    targets = [serialize_target(sql, options) for _, sql in pairs]

    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(sources + targets, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    word_level.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])

    config = T5Config(vocab_size=len(tokenizer), **(t5 or TINY_T5), dropout_rate=0.0, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    encoded = tokenizer(sources, return_tensors="pt", padding=True)
    labels = tokenizer(targets, return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    for _ in range(steps):
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    pytorch_dir = work / "pytorch"
    model.save_pretrained(pytorch_dir)
    tokenizer.save_pretrained(pytorch_dir)
    save_config(pytorch_dir, SerializationConfig(serialization=options, max_source_length=128, max_target_length=16,
                                                 model_base="scratch"))
    export.export_fp32(pytorch_dir, work / "optimum-export", output)
    return output
