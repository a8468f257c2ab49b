"""The answer to a question: the SQL of the nearest known examples, then the model's beams; the first that
executes read-only wins.

Users of one database ask variations of the same questions, and a known example's query is often the answer.
On SpiderMan, the nearest example's SQL is right for 51.1% of the held-out questions of databases the model
trained on (by question) and, with `unseen_db_examples` pairs generated from a new database's own schema and
rows, for 15.0% of the questions of databases it never saw (by database), where a T5 trained from scratch for
30 minutes on CPU writes a correct query for 5.7% and 1.7% (bench/accuracy.py, README "Figures"). So with
`example_candidates: K` the candidates are the SQL of the K nearest examples (in retrieval order), then the
model's beams, which answer whatever has no example that runs (a database with no bank, an inline schema). Measured and rejected: letting the model rank
examples and beams together by its mean log-probability of each (by question 19% EX; it prefers generic
queries) or rank the examples alone (25.5% for the top two, below the nearest one's 49%), and voting among the
five nearest by summed similarity (22%).

`model_inputs` and `answer_candidates` are shared by evaluation, `pipelines.predict` and serving, so all three
answer the same way; the caller picks the first candidate that executes (`generate.first_executable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.common.generate import generate
from pipelines.common.serialize import SerializationConfig, serialize, tidy_sql


def model_inputs(config: SerializationConfig, tokenizer, questions: Sequence[str], schemas: Sequence[Any],
                 db_ids: Sequence[str | None], value_indexes: Sequence[Any], targets: Sequence[Any], k: int = 0,
                 ) -> tuple[list[str], list[list]]:
    """(input texts, the max(k, retrieval_k) bank examples nearest to each question): each question serialized
    with its schema, value index and `retrieval_k` nearest examples, as in training. A database with a target
    (connectable; None for an inline schema) and no bank examples gets generated ones first
    (`SerializationConfig.cover_databases`)."""
    connectable = [(db_id, schema, target) for db_id, schema, target in zip(db_ids, schemas, targets)
                   if db_id is not None and target is not None]
    config.cover_databases({db_id: schema for db_id, schema, _ in connectable},
                           {db_id: target for db_id, _, target in connectable})
    nearest = config.similar_batch(list(questions), list(db_ids), k=max(k, config.serialization.retrieval_k))

    def count_tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    texts = [serialize(question, schema, config.serialization, max_tokens=config.max_source_length,
                       count_tokens=count_tokens, value_index=values,
                       similar=near[: config.serialization.retrieval_k])
             for question, schema, values, near in zip(questions, schemas, value_indexes, nearest)]
    return texts, nearest


@dataclass(frozen=True)
class Candidates:
    beams: list[str]       # the model's beams, in beam-search order
    candidates: list[str]  # the examples' SQL, then the beams that differ from it
    origins: list[str]     # "example" | "model", one per candidate


def with_examples(beams: Sequence[str], examples: Sequence) -> Candidates:
    """The examples' SQL (tidied: the bank holds the model's spaced target text), then each beam that no
    example already spells the same way."""
    candidates = list(dict.fromkeys(tidy_sql(example.sql) for example in examples))
    origins = ["example"] * len(candidates)
    for beam in beams:
        if beam not in candidates:
            candidates.append(beam)
            origins.append("model")
    return Candidates(list(beams), candidates, origins)


def answer_candidates(model, tokenizer, config: SerializationConfig, inputs: Sequence[str], nearest: Sequence[list],
                      *, num_beams: int, example_candidates: int, max_new_tokens: int, batch_size: int = 16,
                      allowed=None) -> list[Candidates]:
    """For each input, the SQL of its `example_candidates` nearest examples, then the model's `num_beams` beams."""
    beams = generate(model, tokenizer, inputs, num_beams=num_beams, num_return_sequences=num_beams,
                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                     max_source_length=config.max_source_length, progress=False, allowed=allowed)
    return [with_examples(found, near[:example_candidates]) for found, near in zip(beams, nearest)]
