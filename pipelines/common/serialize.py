"""(question, schema) -> model input text, and SQL -> model target text.

Input format (one line; ` | ` separates sections, ` ; ` separates tables, `, ` separates columns):

    question: how many customers live in paris? | schema: customers: id (number, pk), name (text),
    city (text, values: Paris / Lyon) ; orders: id (number, pk), customer_id (number) | fk: orders.customer_id = customers.id

- `include_types`: each column carries a coarse type (number, text, time, boolean, blob, others), as in Spider.
- `include_keys`: primary-key columns are marked `pk`, and a final `fk:` section lists foreign keys.
- `sample_values: N`: up to N sample values per column (`values: a / b`).
- `lowercase`: the question, schema names and SQL targets are lower-cased EXCEPT inside quotes ('...' or "..."),
  and sample values keep their case. SQLite identifiers and keywords are case-insensitive, so lower-casing them
  is lossless, while a string literal must stay byte-equal to the value in the database for the query to
  return the right rows; the sample values are where the model can copy that exact case from.

Truncation (when `max_tokens` and `count_tokens` are given): the question is never cut. Schema items are scored
by lexical overlap with the question and the least relevant go first, until the text fits:
sample values, then unmatched columns of unmatched tables, then unmatched tables, then unmatched columns of
matched tables. Whatever still does not fit is cut by the tokenizer's own truncation (schema tail first).

Schema linking (`schema_linking: true`, see `pipelines/common/schema_linking.py`): tables and columns are
scored by `link_schema` (names and cell values, plus an optional database `value_index`) instead of plain
word overlap; matched tables and columns come first and are marked `*`, a column's matched values follow as
SQL literals (`*city (text, = 'Paris')`), tables beyond `linking_max_tables` and unmatched non-key columns
beyond `linking_max_columns` per table are pruned before any truncation. Off, the text is unchanged.

Retrieval (`retrieval_k: K`, see `pipelines/common/retrieval.py`): a `similar:` section after the question
holds the K training examples of the same database nearest to it, as `question => sql` (the SQL exactly as
the model emits it), separated by ` ; `. The bank of examples is stored in the config below.
The serialization config (these options + max lengths) is saved as `serialization.json` beside every model.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from pipelines.common.errors import PipelineError, describe_validation_error
from pipelines.common.io import read_json, write_json
from pipelines.common.params import SerializationParams
from pipelines.common.paths import SERIALIZATION_FILE
from pipelines.common.retrieval import BankExample, ExampleBank
from pipelines.common.schema_linking import fold

# Bumped when the text format changes, so a model is never fed inputs in a format it was not trained on.
FORMAT_VERSION = 3

log = logging.getLogger(__name__)


class SerializationConfig(BaseModel):
    """Everything needed to rebuild a model's inputs exactly as in training (evaluation, serving)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    serialization: SerializationParams
    max_source_length: int
    max_target_length: int
    model_base: str  # `model.base` the tokenizer was built for ("scratch" or a checkpoint)
    # The training examples retrieval draws from (empty unless serialization.retrieval_k > 0).
    examples: list[BankExample] = []
    _bank: ExampleBank | None = PrivateAttr(None)
    _covered: set[str] = PrivateAttr(default_factory=set)
    _cover_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __eq__(self, other: object) -> bool:
        # Fields only: pydantic would also compare the lazily built `_bank`.
        return isinstance(other, SerializationConfig) and self.model_dump() == other.model_dump()

    def similar(self, question: str, db_id: str | None, exclude: int | None = None) -> list[BankExample]:
        """The `retrieval_k` bank examples of `db_id` nearest to `question` (none when retrieval is off)."""
        return self.similar_batch([question], [db_id], [exclude])[0]

    def similar_batch(self, questions: list[str], db_ids: list[str | None],
                      excludes: list[int | None] | None = None, k: int | None = None) -> list[list[BankExample]]:
        """`similar` for many questions at once (one embedding pass); `k` nearest instead of `retrieval_k`
        (the first `retrieval_k` of them are the input's, the rest serve as answer candidates)."""
        if self.serialization.retrieval_k == 0:
            return [[] for _ in questions]
        k = self.serialization.retrieval_k if k is None else k
        return self._retrieval().nearest_batch(questions, db_ids, k, excludes)

    def cover_databases(self, schemas: dict[str, Any], targets: dict[str, Any]) -> None:
        """Give each database of `schemas` (db_id -> snapshot) that has no bank examples
        `unseen_db_examples` question/SQL pairs generated from its own schema and rows (`targets`: db_id ->
        connectable target; `synthetic.generate_pairs`, seeded by the db_id), so retrieval, and the answer
        candidates drawn from it, also work for a database the model never saw. In memory only:
        serialization.json keeps the training examples."""
        n_pairs = self.serialization.unseen_db_examples
        if not (self.serialization.retrieval_k and n_pairs):
            return
        from pipelines.common.synthetic import generate_pairs

        bank = self._retrieval()
        with self._cover_lock:
            added = []
            for db_id, schema in sorted(schemas.items()):
                if db_id in self._covered or bank.has_database(db_id) or targets.get(db_id) is None:
                    continue
                self._covered.add(db_id)  # tried once, even when the database yields no pairs
                try:
                    pairs = generate_pairs(schema, targets[db_id], n_pairs, seed=zlib.crc32(db_id.encode()))
                except PipelineError as exc:
                    log.warning("%s: no generated examples for retrieval: %s", db_id, exc)
                    continue
                added += [BankExample(db_id=db_id, question=p["question"],
                                      sql=serialize_target(p["sql"], self.serialization)) for p in pairs]
            if added:
                log.info("retrieval: %d generated examples for %d database(s) without training examples",
                         len(added), len({e.db_id for e in added}))
                bank.add(added)

    def prepare_retrieval(self) -> None:
        """Build the retrieval index now (serving does at model load, so no request pays for it)."""
        if self.serialization.retrieval_k:
            self._retrieval().prepare()

    def _retrieval(self) -> ExampleBank:
        if self._bank is None:
            self._bank = ExampleBank(self.examples, self.serialization.retrieval_encoder,
                                     self.serialization.retrieval_literal_weight)
        return self._bank


def save_config(directory: str | Path, config: SerializationConfig) -> Path:
    path = Path(directory) / SERIALIZATION_FILE
    write_json(path, config.model_dump())
    return path


def load_config(directory: str | Path) -> SerializationConfig:
    path = Path(directory) / SERIALIZATION_FILE
    raw = read_json(path)
    try:
        config = SerializationConfig.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{path}: invalid serialization config: {describe_validation_error(exc)}") from exc
    if config.format_version != FORMAT_VERSION:
        raise PipelineError(
            f"{path}: serialization format_version {config.format_version}, this code writes "
            f"{FORMAT_VERSION}; re-run the tokenize stage and retrain"
        )
    return config


# --- case handling ---------------------------------------------------------------------------------

# A quote opens a quoted span only when it does not follow a letter or digit, so the apostrophes of
# "what's" or "customers' names" in a question are not mistaken for string literals.
_QUOTED = re.compile(r"""(?<![A-Za-z0-9])(?:'(?:[^']|'')*'|"(?:[^"]|"")*")""")


def _outside_quotes(text: str, edit: Callable[[str], str]) -> str:
    """`edit` applied to every span of `text` outside quotes ('...' and "...", doubled quotes as escapes)."""
    pieces, position = [], 0
    for match in _QUOTED.finditer(text):
        pieces += [edit(text[position : match.start()]), match.group()]
        position = match.end()
    pieces.append(edit(text[position:]))
    return "".join(pieces)


def lowercase_outside_quotes(text: str) -> str:
    """Lower-case everything except quoted spans."""
    return _outside_quotes(text, str.lower)


# `t1.name` -> `t1 . name` (not `4.5`), and spaces inside parentheses: `count(*)` -> `count ( * )`.
_QUALIFIER_DOT = re.compile(r"\b([A-Za-z_]\w*)\s*\.\s*(?=[A-Za-z_`\[])")
_PARENTHESIS = re.compile(r"\s*([()])\s*")
# What `tidy_sql` glues back: a qualified name's dot, and a function name to its opening parenthesis.
_SPACED_DOT = re.compile(r"\b([A-Za-z_]\w*) \. (?=[A-Za-z_`\[])")
_KEYWORDS_BEFORE_PARENTHESIS = {"in", "exists", "from", "join", "on", "and", "or", "not", "as", "where", "select",
                                "union", "intersect", "except", "having", "by", "then", "else", "when", "values"}


def _space(segment: str) -> str:
    segment = _QUALIFIER_DOT.sub(r"\1 . ", segment)
    return _PARENTHESIS.sub(r" \1 ", segment)


def _tidy(segment: str) -> str:
    segment = _SPACED_DOT.sub(r"\1.", segment)
    segment = re.sub(r"\( ", "(", re.sub(r" \)", ")", segment))
    return re.sub(r"\b([A-Za-z_]\w*) \(",
                  lambda m: m.group(0) if m.group(1).lower() in _KEYWORDS_BEFORE_PARENTHESIS else m.group(1) + "(",
                  segment)


def space_sql(sql: str) -> str:
    """SQL with qualified names and parentheses spaced out (`t1 . name`, `count ( * )`), quotes untouched:
    every identifier then follows a space and tokenizes as it does in the schema. Still valid SQL."""
    return " ".join(_outside_quotes(sql, _space).split())


def tidy_sql(sql: str) -> str:
    """The usual spelling of `space_sql`'s output (`t1.name`, `count(*)`); other SQL passes unchanged."""
    return _outside_quotes(sql, _tidy)


def serialize_target(sql: str, cfg: SerializationParams) -> str:
    """The SQL text the model learns to emit (same case rule as the inputs; spaced with split_punctuation)."""
    sql = " ".join(sql.split())
    if cfg.split_punctuation:
        sql = space_sql(sql)
    return lowercase_outside_quotes(sql) if cfg.lowercase else sql


# --- types and relevance ---------------------------------------------------------------------------

_TYPE_RULES = (
    ("boolean", ("BOOL",)),
    ("number", ("INT", "REAL", "NUM", "FLOA", "DOUB", "DEC", "SERIAL")),
    ("time", ("DATE", "TIME", "YEAR")),
    ("text", ("CHAR", "TEXT", "CLOB", "STRING", "VARCHAR")),
    ("blob", ("BLOB", "BINARY", "BYTEA")),
)


def coarse_type(sql_type: str | None) -> str:
    """Map a database column type to Spider's coarse types; the model needs the kind, not the width."""
    upper = (sql_type or "").upper()
    for name, markers in _TYPE_RULES:
        if any(m in upper for m in markers):
            return name
    return "others"


_WORD = re.compile(r"[A-Za-z]+|\d+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def name_words(name: str) -> set[str]:
    """Words of an identifier: `customer_id` / `CustomerId` -> {customer, id}."""
    return {fold(w) for w in _WORD.findall(_CAMEL.sub(" ", name))}


def _overlap(words: set[str], question_words: set[str]) -> float:
    return len(words & question_words) / len(words) if words else 0.0


# --- serialization -------------------------------------------------------------------------------


@dataclass
class _Column:
    name: str
    type: str
    primary_key: bool
    samples: list[str]
    score: float
    show_samples: bool = True
    kept: bool = True
    marked: bool = False  # schema linking found it in the question
    matched_values: list[str] = field(default_factory=list)


@dataclass
class _Table:
    name: str
    score: float
    columns: list[_Column] = field(default_factory=list)
    kept: bool = True
    marked: bool = False

    @property
    def matched(self) -> bool:
        return self.score > 0 or any(c.score > 0 for c in self.columns)


def _prepare(question: str, schema: Any, cfg: SerializationParams, value_index=None) -> list[_Table]:
    if cfg.schema_linking:
        return _prepare_linked(question, schema, cfg, value_index)
    question_words = {fold(w) for w in _WORD.findall(question)}
    question_lower = question.lower()
    tables = []
    for table in schema.tables:
        prepared = _Table(table.name, _overlap(name_words(table.name), question_words))
        for column in table.columns:
            samples = [str(s) for s in (column.samples or [])][: cfg.sample_values]
            score = _overlap(name_words(column.name), question_words)
            # A sample value quoted by the question ("... in Paris") makes the column relevant too.
            if any(len(s) > 2 and s.lower() in question_lower for s in samples):
                score += 1.0
            prepared.columns.append(
                _Column(column.name, coarse_type(column.type), bool(column.primary_key), samples, score)
            )
        tables.append(prepared)
    return tables


def _prepare_linked(question: str, schema: Any, cfg: SerializationParams, value_index) -> list[_Table]:
    from pipelines.common.schema_linking import link_schema

    links = link_schema(question, schema, value_index, max_values=cfg.linking_max_values)
    key_columns = {(fk.table.lower(), fk.column.lower()) for fk in getattr(schema, "foreign_keys", None) or []}
    key_columns |= {(fk.ref_table.lower(), fk.ref_column.lower()) for fk in getattr(schema, "foreign_keys", None) or []}
    tables = []
    for table in schema.tables:
        prepared = _Table(table.name, links.table_score(table.name))
        # Marked only on real evidence: a generic column name alone ("name") gives a table 0.25.
        prepared.marked = prepared.score >= 0.5
        for column in table.columns:
            score = links.column_score(table.name, column.name)
            prepared.columns.append(_Column(
                column.name, coarse_type(column.type), bool(column.primary_key),
                [str(s) for s in (column.samples or [])][: cfg.sample_values], score, marked=score > 0,
                matched_values=links.column_values(table.name, column.name)))
        # Matched columns first (stable, so unmatched ones keep the schema's order with the key in front).
        kept_unmatched = 0
        ordered = sorted(prepared.columns, key=lambda c: -c.score)
        for column in ordered:
            if column.marked or column.primary_key or (table.name.lower(), column.name.lower()) in key_columns:
                continue
            kept_unmatched += 1
            column.kept = cfg.linking_max_columns is None or kept_unmatched <= cfg.linking_max_columns
        prepared.columns = [c for c in ordered if c.kept]
        tables.append(prepared)
    # A table joined by a foreign key to a mentioned one is the likeliest missing link of a join.
    marked_names = {t.name.lower() for t in tables if t.marked}
    for fk in getattr(schema, "foreign_keys", None) or []:
        for here, there in ((fk.table, fk.ref_table), (fk.ref_table, fk.table)):
            if there.lower() in marked_names:
                for table in tables:
                    if table.name.lower() == here.lower() and not table.marked:
                        table.score = max(table.score, 0.1)
    tables = sorted(tables, key=lambda t: -t.score)
    return tables[: cfg.linking_max_tables] if cfg.linking_max_tables is not None else tables


def _removal_steps(tables: list[_Table]) -> list[Callable[[], None]]:
    """The truncation policy as an ordered list of reversible-by-rebuild edits, least relevant first."""
    steps: list[Callable[[], None]] = []

    def by_relevance(columns: list[_Column]) -> list[_Column]:
        return sorted(columns, key=lambda c: c.score)

    every_column = [c for t in tables for c in t.columns]
    for column in by_relevance([c for c in every_column if c.samples]):
        steps.append(lambda c=column: setattr(c, "show_samples", False))
    unmatched_tables = sorted((t for t in tables if not t.matched), key=lambda t: t.score)
    for table in unmatched_tables:
        # Keep the first column (usually the key) so the table stays joinable until it is dropped whole.
        for column in reversed(table.columns[1:]):
            steps.append(lambda c=column: setattr(c, "kept", False))
    for table in reversed(unmatched_tables):
        steps.append(lambda t=table: setattr(t, "kept", False))
    for table in (t for t in tables if t.matched):
        for column in by_relevance([c for c in table.columns if c.score == 0 and not c.primary_key]):
            steps.append(lambda c=column: setattr(c, "kept", False))
    return steps


def _render(question: str, tables: list[_Table], foreign_keys: list[Any], cfg: SerializationParams,
            similar: list[BankExample]) -> str:
    def case(text: str) -> str:
        return lowercase_outside_quotes(text) if cfg.lowercase else text

    # Spaced with split_punctuation, so a marked name tokenizes as it does in the SQL.
    marker = "* " if cfg.split_punctuation else "*"
    rendered_tables = []
    kept_columns: set[tuple[str, str]] = set()
    for table in tables:
        if not table.kept:
            continue
        items = []
        for column in table.columns:
            if not column.kept:
                continue
            kept_columns.add((table.name.lower(), column.name.lower()))
            details = []
            if cfg.include_types:
                details.append(column.type)
            if cfg.include_keys and column.primary_key:
                details.append("pk")
            if column.matched_values:
                # As SQL literals, so the model copies the exact value (case and quotes included).
                details.append("= " + " / ".join("'" + v.replace("'", "''") + "'" for v in column.matched_values))
            if column.show_samples and column.samples:
                details.append("values: " + " / ".join(" ".join(s.split()) for s in column.samples))
            text = (marker if column.marked else "") + case(column.name)
            items.append(f"{text} ({', '.join(details)})" if details else text)
        rendered_tables.append(f"{marker if table.marked else ''}{case(table.name)}: {', '.join(items)}")
    parts = [f"question: {case(' '.join(question.split()))}"]
    if similar:
        parts.append("similar: " + " ; ".join(f"{case(' '.join(e.question.split()))} => {e.sql}" for e in similar))
    parts.append("schema: " + " ; ".join(rendered_tables))
    if cfg.include_keys:
        dot = " . " if cfg.split_punctuation else "."
        links = [
            f"{case(fk.table)}{dot}{case(fk.column)} = {case(fk.ref_table)}{dot}{case(fk.ref_column)}"
            for fk in foreign_keys
            if (fk.table.lower(), fk.column.lower()) in kept_columns
            and (fk.ref_table.lower(), fk.ref_column.lower()) in kept_columns
        ]
        if links:
            parts.append("fk: " + " ; ".join(links))
    return " | ".join(parts)


def serialize(
    question: str,
    schema: Any,
    cfg: SerializationParams,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    value_index: dict | None = None,
    similar: list[BankExample] | None = None,
) -> str:
    """Model input for `question` over `schema` (a `SchemaSnapshot` or anything with the same attributes).

    With `max_tokens` and `count_tokens` (text -> token count, special tokens included), the least relevant
    schema items are dropped until the text fits; see the module docstring for the order. `value_index`
    (`schema_linking.value_index_for`) adds the database's own values to the linking evidence. `similar`
    (`SerializationConfig.similar`) are training examples written before the schema, never dropped."""
    foreign_keys = list(getattr(schema, "foreign_keys", None) or [])
    tables = _prepare(question, schema, cfg, value_index)
    text = _render(question, tables, foreign_keys, cfg, similar or [])
    if max_tokens is None or count_tokens is None or count_tokens(text) <= max_tokens:
        return text
    n_steps = len(_removal_steps(tables))

    def render_after(k: int) -> str:
        fresh = _prepare(question, schema, cfg, value_index)
        for step in _removal_steps(fresh)[:k]:
            step()
        return _render(question, fresh, foreign_keys, cfg, similar or [])

    # Fewer removals is always longer, so binary-search the smallest k that fits: O(log n) tokenizations.
    low, high = 1, n_steps
    while low < high:
        mid = (low + high) // 2
        if count_tokens(render_after(mid)) <= max_tokens:
            high = mid
        else:
            low = mid + 1
    return render_after(low)
