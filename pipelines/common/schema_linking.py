"""Schema linking: which tables, columns and cell values a question mentions.

`link_schema(question, schema, value_index)` scores every table and column of a schema snapshot against
the question and finds the database values the question quotes; `serialize` (with
`tokenize.serialization.schema_linking: true`) puts that evidence into the model input: matched items first
and marked, matched values attached to their column as SQL literals the model can copy, the rest pruned.

Names are split into words (`order_items`, `OrderItems`, `orderItemID` -> order, item(s), id), folded to a
crude singular, and matched against the question's words:
- exact: all words of the name appear as one contiguous phrase of the question -> score 1.0 (0.5 for a name
  made only of generic words such as `name` or `id`, which fit many tables);
- partial: some of its informative words appear anywhere -> 0.5 x the fraction that does.
Cell values match only as a whole phrase of the question (case-insensitive, on word boundaries); a matched
value adds 1.0 to its column. Values come from the snapshot's samples plus an optional `ValueIndex` built
from the database itself (read-only, most frequent values of each text column, cached per database file),
so training, evaluation and serving see the same evidence for the same database.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.common.sql import SQLError, execute_readonly

log = logging.getLogger(__name__)

# Words that say nothing about which table or column is meant; they never make a partial match alone.
_GENERIC = {"id", "code", "name", "type", "number", "no", "num", "the", "of", "a", "an", "in", "is", "by"}
# Values that are also common question words would link columns to every question.
_STOP_VALUES = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "is", "are", "was", "for", "by",
                "with", "all", "any", "what", "which", "who", "how", "many", "much", "name", "names",
                "number", "list", "show", "give", "find", "each", "that", "have", "has", "from", "not", "no"}
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_MAX_VALUE_WORDS = 6
VALUE_QUERY_TIMEOUT_S = 5.0


def fold(word: str) -> str:
    """Crude singular: enough to match `customers` with `customer` and `cities` with `city`."""
    word = word.lower()
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def identifier_words(name: str) -> list[str]:
    """`order_items` / `OrderItems` / `orderItemID` -> ['order', 'item', 'id'] (folded, in order)."""
    return [fold(w) for w in _TOKEN.findall(_CAMEL.sub(" ", name).replace("_", " "))]


def _value_tokens(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _TOKEN.findall(text))


def _is_linkable_value(tokens: tuple[str, ...]) -> bool:
    if not tokens or len(tokens) > _MAX_VALUE_WORDS:
        return False
    joined = "".join(tokens)
    if joined.isdigit():
        # Small numbers (1, 2, 10) are in every question and every key column; years and codes are not.
        return len(joined) >= 3
    return not (len(tokens) == 1 and (len(joined) < 2 or joined in _STOP_VALUES))


def _phrase_in(words: list[str], sequence: list[str]) -> bool:
    n = len(words)
    return n > 0 and any(sequence[i : i + n] == words for i in range(len(sequence) - n + 1))


def name_score(name: str, question_words: list[str]) -> float:
    """1.0 for an exact phrase match, 0.5 x matched fraction of informative words for a partial one."""
    words = identifier_words(name)
    informative = [w for w in words if w not in _GENERIC]
    if _phrase_in(words, question_words):
        return 1.0 if informative else 0.5
    if not informative:
        return 0.0
    present = set(question_words)
    return 0.5 * sum(w in present for w in informative) / len(informative)


# --- value index ------------------------------------------------------------------------------------

ValueIndex = dict[str, dict[str, list[str]]]  # table -> column -> distinct values, most frequent first


def _is_text_column(column: Any) -> bool:
    upper = (column.type or "").upper()
    return not upper or any(m in upper for m in ("CHAR", "TEXT", "CLOB", "STRING", "VARCHAR"))


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def build_value_index(target: str | Path, schema: Any, per_column: int) -> ValueIndex:
    """The `per_column` most frequent non-null values of each text column, read-only through
    `execute_readonly`; a column whose query fails (odd types, timeouts) is left out with a debug line."""
    index: ValueIndex = {}
    if per_column <= 0:
        return index
    for table in schema.tables:
        for column in table.columns:
            if not _is_text_column(column):
                continue
            col, tab = _quote_identifier(column.name), _quote_identifier(table.name)
            sql = (f"SELECT {col}, COUNT(*) FROM {tab} WHERE {col} IS NOT NULL GROUP BY {col} "
                   f"ORDER BY COUNT(*) DESC, {col} LIMIT {int(per_column)}")
            try:
                result = execute_readonly(target, sql, timeout_s=VALUE_QUERY_TIMEOUT_S, max_rows=per_column)
            except SQLError as exc:
                log.debug("%s.%s: no values indexed: %s", table.name, column.name, exc)
                continue
            values = [str(row[0]) for row in result.rows if not isinstance(row[0], bytes)]
            if values:
                index.setdefault(table.name, {})[column.name] = values
    return index


@lru_cache(maxsize=256)
def _cached_index(target: str, schema_json: str, per_column: int, mtime: float) -> ValueIndex:
    from pipelines.common.schema import SchemaSnapshot

    return build_value_index(target, SchemaSnapshot.model_validate_json(schema_json), per_column)


def value_index_for(target: str | Path, schema: Any, per_column: int) -> ValueIndex:
    """`build_value_index`, cached per (database, schema, size) in this process; a SQLite file that
    changed on disk is indexed again."""
    from pipelines.common.databases import sqlite_path

    path = sqlite_path(target)
    mtime = path.stat().st_mtime if path is not None and path.exists() else 0.0
    return _cached_index(str(target), schema.model_dump_json(), per_column, mtime)


# --- linking ----------------------------------------------------------------------------------------


@dataclass
class SchemaLinks:
    """Evidence for one question: scores keyed by lower-cased names, matched values as stored."""

    tables: dict[str, float] = field(default_factory=dict)
    columns: dict[tuple[str, str], float] = field(default_factory=dict)
    values: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def table_score(self, table: str) -> float:
        return self.tables.get(table.lower(), 0.0)

    def column_score(self, table: str, column: str) -> float:
        return self.columns.get((table.lower(), column.lower()), 0.0)

    def column_values(self, table: str, column: str) -> list[str]:
        return self.values.get((table.lower(), column.lower()), [])


def link_schema(question: str, schema: Any, value_index: ValueIndex | None = None,
                max_values: int = 3) -> SchemaLinks:
    """Score the schema's tables and columns against `question` and find the values it quotes.

    A column's score is its name score plus 1.0 when one of its values is in the question; a table's is
    its name score plus half of its best column's score (a mentioned column points at its table)."""
    question_words = identifier_words(question)
    question_tokens = _value_tokens(question)
    phrases = {tuple(question_tokens[i : i + n]) for n in range(1, _MAX_VALUE_WORDS + 1)
               for i in range(len(question_tokens) - n + 1)}
    links = SchemaLinks()
    for table in schema.tables:
        indexed = (value_index or {}).get(table.name, {})
        best_column = 0.0
        for column in table.columns:
            score = name_score(column.name, question_words)
            candidates = [str(v) for v in (column.samples or [])] + indexed.get(column.name, [])
            matched: list[str] = []
            for value in candidates:
                tokens = _value_tokens(value)
                if value not in matched and _is_linkable_value(tokens) and tokens in phrases:
                    matched.append(value)
            if matched:
                # Longest first: "New York City" is better evidence than "York".
                matched.sort(key=lambda v: -len(_value_tokens(v)))
                links.values[(table.name.lower(), column.name.lower())] = matched[:max_values]
                score += 1.0
            if score > 0:
                links.columns[(table.name.lower(), column.name.lower())] = score
            best_column = max(best_column, score)
        table_score = name_score(table.name, question_words) + 0.5 * best_column
        if table_score > 0:
            links.tables[table.name.lower()] = table_score
    return links


def value_indexes(schemas: dict[str, Any], targets: dict[str, str], per_column: int) -> dict[str, ValueIndex]:
    """`value_index_for` each database of `schemas` (db_id -> snapshot) at `targets` (db_id -> target),
    with a progress line per 20 databases since big benchmarks have a few hundred."""
    indexes = {}
    for position, (db_id, schema) in enumerate(sorted(schemas.items()), 1):
        indexes[db_id] = value_index_for(targets[db_id], schema, per_column)
        if position % 20 == 0:
            log.info("indexed the values of %d/%d databases", position, len(schemas))
    return indexes
