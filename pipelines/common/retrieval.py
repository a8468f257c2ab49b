"""Retrieval of similar training examples: the nearest training questions of the same database, with their SQL.

Used by serialization when `tokenize.serialization.retrieval_k > 0`: the model input then carries, before the
schema, `similar: <question> => <sql>` for the k training questions of the same database most similar to the
asked one. Users of one database ask variations of the same questions (Spider annotates most queries with two
phrasings), so the nearest example's SQL is often the answer or one edit away, and copying a query from the
input is far easier for a small model trained from scratch than composing it from the schema.

Similarity is TF-IDF cosine over stemmed words and word bigrams of the questions (numbers and quoted values
included, since "older than 30" and "older than 40" should both match a query with an age filter). The bank
of examples travels inside each model's serialization.json, so evaluation and serving retrieve from exactly
the examples the model was trained with. A database with no examples in the bank gets no `similar:` section.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from pipelines.common.schema_linking import fold

_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?")


class BankExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    db_id: str
    question: str
    sql: str  # the serialized target text, exactly what the model emits


def question_terms(question: str) -> Counter:
    """Stemmed words and adjacent-word bigrams of a question."""
    words = [fold(w) for w in _TOKEN.findall(question.lower())]
    return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:])])


@dataclass
class _Entry:
    index: int
    weights: dict[str, float]  # term -> tf-idf weight, L2-normalized


class ExampleBank:
    """Per-database TF-IDF index over `examples`; `nearest` returns the most similar ones of one database."""

    def __init__(self, examples: list[BankExample]):
        self.examples = list(examples)
        by_db: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(self.examples):
            by_db[example.db_id].append(i)
        self._postings: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self._idf: dict[str, dict[str, float]] = {}
        for db_id, indexes in by_db.items():
            terms = {i: question_terms(self.examples[i].question) for i in indexes}
            document_frequency = Counter(t for counts in terms.values() for t in counts)
            idf = {t: math.log((1 + len(indexes)) / (1 + df)) + 1.0 for t, df in document_frequency.items()}
            postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for i, counts in terms.items():
                for term, weight in _normalized(counts, idf).items():
                    postings[term].append((i, weight))
            self._postings[db_id], self._idf[db_id] = dict(postings), idf

    def __len__(self) -> int:
        return len(self.examples)

    def nearest(self, question: str, db_id: str, k: int, exclude: int | None = None) -> list[BankExample]:
        """The k examples of `db_id` most similar to `question` (best first; ties keep bank order), leaving out
        bank index `exclude` (an example is not its own neighbour when training inputs are built)."""
        postings = self._postings.get(db_id)
        if not postings or k <= 0:
            return []
        scores: dict[int, float] = defaultdict(float)
        for term, weight in _normalized(question_terms(question), self._idf[db_id]).items():
            for index, other in postings.get(term, ()):
                if index != exclude:
                    scores[index] += weight * other
        best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [self.examples[i] for i, _ in best]


def _normalized(counts: Counter, idf: dict[str, float]) -> dict[str, float]:
    # Terms unseen in the database carry no evidence, so they are dropped rather than given a default idf.
    weights = {t: (1 + math.log(n)) * idf[t] for t, n in counts.items() if t in idf}
    norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
    return {t: w / norm for t, w in weights.items()}
