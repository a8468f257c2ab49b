"""Schema-driven synthetic question/SQL pairs for any database.

`generate_pairs(schema, target, n_pairs, seed)` reads only the schema snapshot (tables, columns, keys,
foreign keys) and the database's own values (profiled read-only through `execute_readonly`), so the
same templates serve the demo database and every SpiderMan database. Templates cover projection,
filters on real values (=, <, >, LIKE, BETWEEN), aggregates, GROUP BY with and without HAVING,
ORDER BY ... LIMIT, DISTINCT, joins over real foreign keys (one and two hops), IN / NOT IN and
scalar subqueries, and UNION / INTERSECT / EXCEPT, each with several phrasings.

Every pair is kept only if its SQL parses, executes on the database and returns a non-empty,
non-NULL result; pairs are unique by question and by SQL; the output is a function of the seed."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.common.errors import PipelineError
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.sql import CANONICAL_DIALECT, SQLITE_KEYWORDS, SQLError, execute_readonly, parse_sql

log = logging.getLogger(__name__)

PROFILE_VALUES = 40          # most frequent distinct values kept per column
MAX_GROUPS = 60              # a column with more distinct values is not used for GROUP BY
QUERY_TIMEOUT_S = 5.0
PROFILE_ROWS = 10_000        # rows fetched by a profiling query
CHECK_ROWS = 100             # rows fetched to decide whether a generated query's result is meaningful

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?$")
_WORD = re.compile(r"[A-Za-z]{3,}")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_KEY_NAME = re.compile(r"(^|_)id$|[a-z]Id$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------
# Human-readable names


def humanize(identifier: str) -> str:
    """`order_items` -> `order items`, `customerName` -> `customer name`, `CustomerID` -> `customer id`."""
    spaced = _CAMEL.sub(" ", identifier).replace("_", " ").replace("-", " ")
    return " ".join(spaced.lower().split())


_IRREGULAR_PLURALS = {"person": "people", "child": "children", "man": "men", "woman": "women",
                      "staff": "staff", "series": "series", "species": "species", "info": "info",
                      "information": "information", "data": "data", "equipment": "equipment"}
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in _IRREGULAR_PLURALS.items()}


def singular(phrase: str) -> str:
    """Singular of the last word of a noun phrase (`order items` -> `order item`)."""
    head, _, word = phrase.rpartition(" ")
    if word in _IRREGULAR_SINGULARS:
        word = _IRREGULAR_SINGULARS[word]
    elif re.search(r"[^aeiou]ies$", word):
        word = word[:-3] + "y"
    elif re.search(r"(ss|x|z|ch|sh)es$", word) or word.endswith("statuses") or word.endswith("buses"):
        word = word[:-2]
    elif word.endswith("s") and not re.search(r"(ss|us|is)$", word) and len(word) > 3:
        word = word[:-1]
    return f"{head} {word}" if head else word


_PREPOSITION = re.compile(r" (in|of|per|for|on|at|by|to|from) ")


def plural(phrase: str) -> str:
    """Plural of a noun phrase's head word (`unit price` -> `unit prices`, `unit in stock` -> `units in
    stock`); already-plural phrases stay as they are."""
    split = _PREPOSITION.search(phrase)
    if split:
        return plural(phrase[: split.start()]) + phrase[split.start():]
    head, _, word = phrase.rpartition(" ")
    if singular(word) != word:
        return phrase
    if word in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[word]
    elif re.search(r"[^aeiou]y$", word):
        word = word[:-1] + "ies"
    elif re.search(r"(s|x|z|ch|sh)$", word):
        word += "es"
    else:
        word += "s"
    return f"{head} {word}" if head else word


def _article(noun: str) -> str:
    # "an order", "a unit price", "a user": a leading u sounds like "you" in uni-/use-/usu- words.
    vowel_sound = noun[:1] in "aeio" or (noun[:1] == "u" and not re.match(r"u(ni|se|su|ti)", noun))
    return f"an {noun}" if vowel_sound else f"a {noun}"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------------
# Database profile: what the templates may use, read from the schema and the data


@dataclass
class ColumnProfile:
    table: str
    name: str
    kind: str                      # key | number | date | text | other
    n_distinct: int
    n_values: int                  # non-NULL values
    frequent: list[tuple[Any, int]]  # (value, row count), most frequent first
    quantiles: list[Any]           # sorted quantile values of number / date columns
    phrase: str = ""

    @property
    def values(self) -> list[Any]:
        return [value for value, _ in self.frequent]

    @property
    def groupable(self) -> bool:
        # Groups must repeat (a city, a status); grouping by a nearly unique column asks nothing.
        return (self.kind in ("text", "number", "date") and 2 <= self.n_distinct <= MAX_GROUPS
                and 2 * self.n_distinct <= self.n_values)

    @property
    def comparable(self) -> bool:
        return self.kind in ("number", "date") and len(set(self.quantiles)) >= 3


@dataclass
class TableProfile:
    name: str
    n_rows: int
    columns: list[ColumnProfile]
    primary_key: ColumnProfile | None
    singular: str = ""
    plural: str = ""

    def attributes(self, *kinds: str) -> list[ColumnProfile]:
        """Non-key columns with at least one value, optionally only of the given kinds."""
        return [c for c in self.columns if c.kind not in ("key", "other") and c.frequent
                and (not kinds or c.kind in kinds)]

    @property
    def label(self) -> ColumnProfile | None:
        """The column that names a row (`name`, `title`, ...), else the first text column."""
        texts = self.attributes("text")
        named = [c for c in texts if re.search(r"name|title", c.name, re.IGNORECASE)]
        return (named or texts or [None])[0]


@dataclass
class Link:
    """One foreign key: child.fk references parent.ref; `role` is how the child names the parent."""
    child: TableProfile
    fk: ColumnProfile
    parent: TableProfile
    ref: ColumnProfile
    role: str


@dataclass
class DatabaseProfile:
    tables: list[TableProfile]
    links: list[Link] = field(default_factory=list)


def _kind_of(values: list[Any], declared_type: str, is_key: bool) -> str:
    if not values:
        return "other"
    if all(isinstance(v, (dt.date, dt.datetime)) for v in values):
        return "date"
    if all(isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool) for v in values):
        return "key" if is_key else "number"
    if all(isinstance(v, str) for v in values):
        if is_key:
            return "key"
        declared_date = re.search(r"date|time", declared_type, re.IGNORECASE)
        if all(_DATE.match(v) for v in values) or (
                declared_date and all(_DATE.match(v[:10]) for v in values)):
            return "date"
        return "text"
    return "other"


def _plain(value: Any) -> Any:
    """Database values as Python scalars the templates can print (dates as ISO text, Decimal as float)."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


class _Database:
    """Read-only access to the target through the pipeline's safe executor."""

    def __init__(self, target: str | Path):
        self.target = target

    def rows(self, sql: str, max_rows: int = PROFILE_ROWS) -> list[tuple]:
        return execute_readonly(self.target, sql, timeout_s=QUERY_TIMEOUT_S, max_rows=max_rows).rows


def quote(identifier: str) -> str:
    """An identifier as SQLite reads it: bare when plain, double-quoted otherwise."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", identifier) and identifier.upper() not in SQLITE_KEYWORDS:
        return identifier
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value) if isinstance(value, float) else str(value)


def _say(value: Any) -> str:
    """A value as written in a question."""
    if isinstance(value, float):
        # The shortest text that reads back as the same number, so question and SQL agree exactly.
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def profile_database(schema: SchemaSnapshot, target: str | Path) -> DatabaseProfile:
    """Profile every column of every non-empty table: kind, distinct values, frequencies, quantiles."""
    db = _Database(target)
    key_columns = {(fk.table.lower(), fk.column.lower()) for fk in schema.foreign_keys}
    key_columns |= {(fk.ref_table.lower(), fk.ref_column.lower()) for fk in schema.foreign_keys}
    tables: list[TableProfile] = []
    for table in schema.tables:
        t = quote(table.name)
        try:
            n_rows = db.rows(f"SELECT COUNT(*) FROM {t}")[0][0]
        except SQLError as exc:
            raise PipelineError(f"{schema.db_id}: table {table.name!r} of the schema snapshot "
                                f"cannot be read: {exc}") from exc
        if not n_rows:
            continue
        columns = []
        for column in table.columns:
            c = quote(column.name)
            is_key = column.primary_key or (table.name.lower(), column.name.lower()) in key_columns \
                or bool(_KEY_NAME.search(column.name))
            frequent = [(_plain(v), n) for v, n in db.rows(
                f"SELECT {c}, COUNT(*) FROM {t} WHERE {c} IS NOT NULL GROUP BY {c} "
                f"ORDER BY COUNT(*) DESC, {c} LIMIT {PROFILE_VALUES}")]
            kind = _kind_of([v for v, _ in frequent], column.type, is_key)
            if kind == "text" and any(isinstance(v, str) and ("\n" in v or len(v) > 80) for v, _ in frequent):
                kind = "other"  # free text (descriptions, notes): no believable question filters on it
            n_distinct, n_values = db.rows(f"SELECT COUNT(DISTINCT {c}), COUNT({c}) FROM {t}")[0]
            quantiles = []
            if kind in ("number", "date") and n_values:
                # Deciles in one sort: the smallest value of each of the upper nine tenths.
                deciles = db.rows(f"SELECT MIN({c}) FROM (SELECT {c}, NTILE(10) OVER (ORDER BY {c}) "
                                  f"AS decile FROM {t} WHERE {c} IS NOT NULL) AS ranked "
                                  f"GROUP BY decile ORDER BY decile")
                quantiles = [_plain(value) for (value,) in deciles[1:]]
            columns.append(ColumnProfile(table=table.name, name=column.name, kind=kind, n_distinct=n_distinct,
                                         n_values=n_values, frequent=frequent, quantiles=quantiles,
                                         phrase=humanize(column.name)))
        primary = next((p for p, col in zip(columns, table.columns) if col.primary_key), None)
        noun = humanize(table.name)
        tables.append(TableProfile(name=table.name, n_rows=n_rows, columns=columns, primary_key=primary,
                                   singular=singular(noun), plural=plural(noun)))

    by_name = {t.name.lower(): t for t in tables}
    links = []
    for fk in schema.foreign_keys:
        child, parent = by_name.get(fk.table.lower()), by_name.get(fk.ref_table.lower())
        if child is None or parent is None:
            continue
        fk_col = next((c for c in child.columns if c.name.lower() == fk.column.lower()), None)
        ref_col = next((c for c in parent.columns if c.name.lower() == fk.ref_column.lower()), None)
        if fk_col is None or ref_col is None or not fk_col.frequent:
            continue
        # `manager_id` -> employees: the child calls its parent "manager", not "employee".
        role = re.sub(r"\s*\bid$", "", humanize(fk.column)).strip() or parent.singular
        if child is not parent and role in (fk_col.phrase, humanize(fk.ref_column)):
            role = parent.singular
        links.append(Link(child=child, fk=fk_col, parent=parent, ref=ref_col, role=role))
    return DatabaseProfile(tables=tables, links=links)


# ---------------------------------------------------------------------------------------------------
# Conditions: one predicate on a real value, with its SQL and its English


@dataclass
class Condition:
    sql: str
    clause: str    # "status is delivered"   -> used after "whose" / "where the"
    with_: str     # "with status delivered" -> used after a noun
    has: str       # "status delivered"      -> used after "have"


class _Templates:
    """Every template returns (question, sql) or None when the schema or the dice do not fit it."""

    def __init__(self, profile: DatabaseProfile, rng: random.Random):
        self.profile = profile
        self.rng = rng
        self.tables = [t for t in profile.tables if t.attributes()]

    # --- helpers -----------------------------------------------------------------------------------

    def choice(self, options):
        return self.rng.choice(options) if options else None

    def value_text(self, value: Any) -> str:
        text = _say(value)
        return f'"{text}"' if isinstance(value, str) and self.rng.random() < 0.5 else text

    def condition(self, column: ColumnProfile, alias: str = "", op: str | None = None) -> Condition | None:
        """A predicate on `column` using one of its real values; `op` forces the operator family."""
        col = f"{alias}{quote(column.name)}"
        name = column.phrase
        ops = ["eq"]
        if column.comparable:
            ops += ["gt", "lt", "between"]
        if column.kind == "text":
            ops += ["like"]
        op = op or self.choice(ops)
        if op not in ops:
            return None
        is_date = column.kind == "date"
        if op == "eq":
            value = self.choice(column.values)
            said = self.value_text(value)
            return Condition(f"{col} = {literal(value)}", f"{name} is {said}",
                             self.choice([f"with {name} {said}",
                                          f"whose {name} is {said}"]), f"{name} {said}")
        if op in ("gt", "lt"):
            value = self.choice(column.quantiles[1:-1])
            if op == "gt":
                words = ["after", "later than"] if is_date else ["greater than", "more than", "above", "over"]
                sql = f"{col} > {literal(value)}"
            else:
                words = ["before", "earlier than"] if is_date else ["less than", "below", "under",
                                                                     "smaller than"]
                sql = f"{col} < {literal(value)}"
            word = self.choice(words)
            return Condition(sql, f"{name} is {word} {_say(value)}", f"with {name} {word} {_say(value)}",
                             f"{_article(name)} {word} {_say(value)}")
        if op == "between":
            low, high = sorted(self.rng.sample(sorted(set(column.quantiles)), 2))
            span = f"between {_say(low)} and {_say(high)}"
            return Condition(f"{col} BETWEEN {literal(low)} AND {literal(high)}", f"{name} is {span}",
                             self.choice([f"with {name} {span}",
                                          f"whose {name} lies {span}"]), f"{_article(name)} {span}")
        # LIKE: a prefix, a word or a suffix of a real value, so the pattern matches something.
        value = self.choice([v for v in column.values if isinstance(v, str) and _WORD.search(v)])
        if value is None:
            return None
        words = _WORD.findall(value)
        shape = self.choice(["prefix", "contains", "suffix"])
        if shape == "prefix":
            whole_word = value.startswith(words[0]) and self.rng.random() < 0.5
            part = words[0] if whole_word else value[: self.rng.randint(1, 3)]
            if "%" in part or "_" in part or "'" in part:
                return None
            verb, verbing = self.choice([("starts with", "starting with"), ("begins with", "beginning with")])
            pattern = f"{part}%"
        elif shape == "contains":
            part, pattern = (word := self.choice(words)), f"%{word}%"
            verb, verbing = self.choice([("contains", "containing"), ("includes", "including")])
        else:
            part = words[-1]
            if not value.endswith(part):
                return None
            pattern, verb, verbing = f"%{part}", "ends with", "ending with"
        said = f'"{part}"'
        return Condition(f"{col} LIKE {literal(pattern)}",
        f"{name} {verb} {said}",
        f"whose {name} {verb} {said}",
                         f"{_article(name)} {verbing} {said}")

    def where(self, cond: Condition) -> str:
        """The English for 'rows matching cond' after a plural noun."""
        return self.choice([f"whose {cond.clause}", f"where the {cond.clause}", cond.with_])

    def shown(self, table: TableProfile, exclude: ColumnProfile | None = None) -> list[ColumnProfile]:
        """One or two columns to show, favouring the label column."""
        options = [c for c in table.attributes() if c is not exclude]
        if not options:
            return []
        label = table.label
        first = label if label in options and self.rng.random() < 0.6 else self.choice(options)
        rest = [c for c in options if c is not first]
        return [first, self.choice(rest)] if rest and self.rng.random() < 0.3 else [first]

    @staticmethod
    def sql_list(columns: list[ColumnProfile], alias: str = "") -> str:
        return ", ".join(f"{alias}{quote(c.name)}" for c in columns)

    @staticmethod
    def say_list(columns: list[ColumnProfile]) -> str:
        return " and ".join(c.phrase for c in columns)

    def table_with(self, need: Callable[[TableProfile], list]) -> tuple[TableProfile, list] | None:
        candidates = [(t, need(t)) for t in self.tables]
        candidates = [(t, found) for t, found in candidates if found]
        return self.choice(candidates)

    def link(self, allow_self: bool = True) -> Link | None:
        """A foreign key whose parent has columns to talk about."""
        links = [lk for lk in self.profile.links
                 if lk.parent.attributes() and (allow_self or lk.child is not lk.parent)]
        return self.choice(links)

    # --- projection ---------------------------------------------------------------------------------

    def select_columns(self):
        table = self.choice(self.tables)
        cols = self.shown(table)
        if not cols:
            return None
        what, T = self.say_list(cols), table.plural
        question = self.choice([f"List the {what} of all {T}.", f"Show the {what} of every {table.singular}.",
                                f"What are the {what} of the {T}?",
                                f"Give me the {what} for each {table.singular}."])
        return question, f"SELECT {self.sql_list(cols)} FROM {quote(table.name)}"

    # --- filters --------------------------------------------------------------------------------------

    def _filter(self, op: str, kinds: tuple[str, ...]):
        needs_order = op in ("gt", "lt", "between")
        found = self.table_with(lambda t: [c for c in t.attributes(*kinds)
                                           if c.comparable or not needs_order])
        if not found:
            return None
        table, columns = found
        column = self.choice(columns)
        cond = self.condition(column, op=op)
        cols = self.shown(table, exclude=column if op == "eq" else None)
        if cond is None or not cols:
            return None
        what, T = self.say_list(cols), table.plural
        where = self.where(cond)
        question = self.choice([f"What are the {what} of the {T} {where}?",
                                f"List the {what} of {T} {where}.",
                                f"Find the {what} of all {T} {where}.",
                                f"Which {T} have {cond.has}? Show their {what}."])
        return question, f"SELECT {self.sql_list(cols)} FROM {quote(table.name)} WHERE {cond.sql}"

    def filter_equals(self):
        return self._filter("eq", ("text", "number", "date"))

    def filter_compare(self):
        return self._filter(self.choice(["gt", "lt"]), ("number", "date"))

    def filter_like(self):
        return self._filter("like", ("text",))

    def filter_between(self):
        return self._filter("between", ("number", "date"))

    def filter_two_conditions(self):
        found = self.table_with(lambda t: t.attributes() if len(t.attributes()) >= 2 else [])
        if not found:
            return None
        table, columns = found
        first, second = self.rng.sample(columns, 2)
        c1, c2 = self.condition(first), self.condition(second)
        cols = self.shown(table)
        if c1 is None or c2 is None or not cols:
            return None
        joiner = self.choice(["AND", "OR"])
        word = "and" if joiner == "AND" else "or"
        question = self.choice([
            f"List the {self.say_list(cols)} of {table.plural} whose {c1.clause} {word} whose {c2.clause}.",
            f"Which {table.plural} have {c1.has} {word} {c2.has}? Give their {self.say_list(cols)}.",
        ])
        return question, (f"SELECT {self.sql_list(cols)} FROM {quote(table.name)} "
                          f"WHERE {c1.sql} {joiner} {c2.sql}")

    # --- aggregates -----------------------------------------------------------------------------------

    def count_rows(self):
        table = self.choice(self.tables)
        T = table.plural
        if self.rng.random() < 0.25:
            question = self.choice([f"How many {T} are there?", f"Count the {T}.",
                                    f"What is the total number of {T}?"])
            return question, f"SELECT COUNT(*) FROM {quote(table.name)}"
        cond = self.condition(self.choice(table.attributes()))
        if cond is None:
            return None
        where = self.where(cond)
        question = self.choice([f"How many {T} are there {where}?", f"Count the {T} {where}.",
                                f"What is the number of {T} {where}?", f"How many {T} have {cond.has}?"])
        return question, f"SELECT COUNT(*) FROM {quote(table.name)} WHERE {cond.sql}"

    _AGGREGATES = {"AVG": ["average", "mean"], "SUM": ["total", "sum of the"],
                   "MIN": ["minimum", "lowest", "smallest"], "MAX": ["maximum", "highest", "largest"]}

    def aggregate(self):
        found = self.table_with(lambda t: t.attributes("number"))
        if not found:
            return None
        table, numbers = found
        column = self.choice(numbers)
        func = self.choice(list(self._AGGREGATES))
        word = self.choice(self._AGGREGATES[func])
        sql = f"SELECT {func}({quote(column.name)}) FROM {quote(table.name)}"
        scope = f"all {table.plural}"
        if self.rng.random() < 0.5:
            cond = self.condition(self.choice([c for c in table.attributes() if c is not column] or [column]))
            if cond is None:
                return None
            sql += f" WHERE {cond.sql}"
            scope = f"{table.plural} {self.where(cond)}"
        question = self.choice([f"What is the {word} {column.phrase} of {scope}?",
                                f"Find the {word} {column.phrase} among {scope}.",
                                f"Compute the {word} {column.phrase} over {scope}."])
        return question, sql

    def aggregate_pair(self):
        found = self.table_with(lambda t: t.attributes("number"))
        if not found:
            return None
        table, numbers = found
        column = self.choice(numbers)
        (f1, w1), (f2, w2) = self.choice([
            (("MIN", "minimum"), ("MAX", "maximum")), (("MIN", "lowest"), ("MAX", "highest")),
            (("SUM", "total"), ("AVG", "average")), (("MAX", "maximum"), ("SUM", "total")),
        ])
        c, sql = quote(column.name), ""
        scope = f"all {table.plural}"
        if self.rng.random() < 0.4:
            cond = self.condition(self.choice([a for a in table.attributes() if a is not column] or [column]))
            if cond is None:
                return None
            sql, scope = f" WHERE {cond.sql}", f"{table.plural} {self.where(cond)}"
        question = self.choice([f"What are the {w1} and {w2} {column.phrase} of {scope}?",
                                f"Show the {w1} and the {w2} {column.phrase} across {scope}.",
                                f"Give the {w1} {column.phrase} and the {w2} {column.phrase} of {scope}."])
        return question, f"SELECT {f1}({c}), {f2}({c}) FROM {quote(table.name)}{sql}"

    def count_distinct(self):
        found = self.table_with(lambda t: [c for c in t.attributes() if c.n_distinct >= 2])
        if not found:
            return None
        table, columns = found
        column = self.choice(columns)
        question = self.choice([f"How many different {plural(column.phrase)} do the {table.plural} have?",
                                f"Count the distinct {column.phrase} values of {table.plural}.",
                                f"How many distinct {plural(column.phrase)} are there among {table.plural}?"])
        return question, f"SELECT COUNT(DISTINCT {quote(column.name)}) FROM {quote(table.name)}"

    # --- grouping ---------------------------------------------------------------------------------------

    def group_by(self):
        found = self.table_with(lambda t: [c for c in t.attributes() if c.groupable])
        if not found:
            return None
        table, groups = found
        group = self.choice(groups)
        g, T = group.phrase, table.plural
        numbers = [c for c in table.attributes("number") if c is not group]
        if numbers and self.rng.random() < 0.5:
            column = self.choice(numbers)
            func = self.choice(list(self._AGGREGATES))
            word = self.choice(self._AGGREGATES[func])
            question = self.choice([f"What is the {word} {column.phrase} of {T} for each {g}?",
                                    f"For every {g}, show the {word} {column.phrase} of the {T}.",
                                    f"Give the {word} {column.phrase} per {g} across all {T}."])
            select = f"{quote(group.name)}, {func}({quote(column.name)})"
        else:
            question = self.choice([f"How many {T} are there for each {g}?", f"Count the {T} per {g}.",
                                    f"For every {g}, show the number of {T}.",
                                    f"Show each {g} and how many {T} have it."])
            select = f"{quote(group.name)}, COUNT(*)"
        sql = f"SELECT {select} FROM {quote(table.name)}"
        if self.rng.random() < 0.3:
            cond = self.condition(self.choice([c for c in table.attributes() if c is not group] or [group]))
            if cond is None:
                return None
            sql += f" WHERE {cond.sql}"
            question = question.rstrip(".?") + f", considering only {T} {self.where(cond)}."
        return question, f"{sql} GROUP BY {quote(group.name)}"

    def group_having(self):
        found = self.table_with(lambda t: [c for c in t.attributes() if c.groupable])
        if not found:
            return None
        table, groups = found
        group = self.choice(groups)
        g, gs, T = group.phrase, plural(group.phrase), table.plural
        numbers = [c for c in table.attributes("number") if c is not group and c.comparable]
        base = f"SELECT {quote(group.name)} FROM {quote(table.name)} GROUP BY {quote(group.name)}"
        if numbers and self.rng.random() < 0.4:
            column = self.choice(numbers)
            threshold = self.choice(column.quantiles[2:-2])
            word = self.choice(["above", "greater than", "higher than"])
            question = self.choice([
                f"Which {gs} have an average {column.phrase} {word} {_say(threshold)} among their {T}?",
                f"List the {gs} whose {T} have an average {column.phrase} {word} {_say(threshold)}.",
            ])
            return question, f"{base} HAVING AVG({quote(column.name)}) > {literal(threshold)}"
        # A threshold between real group sizes, so some groups pass and some do not.
        sizes = sorted({n for _, n in group.frequent})
        if len(sizes) < 2:
            return None
        threshold = self.choice(sizes[:-1])
        op, word = self.choice([(">", "more than"), (">=", "at least")])
        if op == ">=":
            threshold = sizes[sizes.index(threshold) + 1]
        question = self.choice([f"Which {gs} have {word} {threshold} {T}?",
                                f"List the {gs} shared by {word} {threshold} {T}.",
                                f"Find every {g} that appears in {word} {threshold} {T}."])
        return question, f"{base} HAVING COUNT(*) {op} {threshold}"

    # --- ordering -----------------------------------------------------------------------------------------

    def order_limit(self):
        found = self.table_with(lambda t: [c for c in t.attributes("number", "date") if c.n_distinct >= 3])
        if not found:
            return None
        table, columns = found
        column = self.choice(columns)
        cols = self.shown(table, exclude=column)
        if not cols:
            return None
        what = self.say_list(cols)
        descending = self.rng.random() < 0.5
        order = "DESC" if descending else "ASC"
        extreme = ("latest" if descending else "earliest") if column.kind == "date" else \
            self.choice(["highest", "largest"]) if descending else self.choice(["lowest", "smallest"])
        k = self.choice([1, 1, 3, 5, 10])
        if k == 1:
            question = self.choice([
                f"What is the {what} of the {table.singular} with the {extreme} {column.phrase}?",
                f"Which {table.singular} has the {extreme} {column.phrase}? Give its {what}.",
            ])
        else:
            question = self.choice([
                f"List the {what} of the {k} {table.plural} with the {extreme} {column.phrase}.",
                f"Show the {what} of the top {k} {table.plural} by {column.phrase}"
                + (" in descending order." if descending else ", smallest first."),
                f"Which {k} {table.plural} have the {extreme} {column.phrase}? Show their {what}.",
            ])
        return question, (f"SELECT {self.sql_list(cols)} FROM {quote(table.name)} "
                          f"ORDER BY {quote(column.name)} {order} LIMIT {k}")

    def group_order_limit(self):
        found = self.table_with(lambda t: [c for c in t.attributes() if c.groupable])
        if not found:
            return None
        table, groups = found
        group = self.choice(groups)
        most = self.rng.random() < 0.7
        word = "most" if most else "fewest"
        question = self.choice([f"Which {group.phrase} has the {word} {table.plural}?",
                                f"What is the {group.phrase} with the {word} {table.plural}?",
                                f"Find the {group.phrase} shared by the {word} {table.plural}."])
        return question, (f"SELECT {quote(group.name)} FROM {quote(table.name)} GROUP BY {quote(group.name)} "
                          f"ORDER BY COUNT(*) {'DESC' if most else 'ASC'} LIMIT 1")

    # --- distinct -----------------------------------------------------------------------------------------

    def distinct(self):
        found = self.table_with(lambda t: [c for c in t.attributes() if c.n_distinct < t.n_rows])
        if not found:
            return None
        table, columns = found
        column = self.choice(columns)
        ps = plural(column.phrase)
        sql = f"SELECT DISTINCT {quote(column.name)} FROM {quote(table.name)}"
        if self.rng.random() < 0.6:
            cond = self.condition(self.choice([c for c in table.attributes() if c is not column] or [column]))
            if cond is None:
                return None
            where = self.where(cond)
            question = self.choice([f"What are the distinct {ps} of {table.plural} {where}?",
                                    f"List the different {ps} of the {table.plural} {where}.",
                                    f"Show each {column.phrase} of {table.plural} {where} once."])
            return question, f"{sql} WHERE {cond.sql}"
        question = self.choice([f"What are the distinct {ps} of the {table.plural}?",
                                f"List all different {ps} of {table.plural}.",
                                f"Which {ps} do the {table.plural} have? List each once."])
        return question, sql

    # --- joins ------------------------------------------------------------------------------------------

    def _on(self, link: Link, child_alias: str, parent_alias: str) -> str:
        return f"{child_alias}.{quote(link.fk.name)} = {parent_alias}.{quote(link.ref.name)}"

    def join_one_hop(self):
        link = self.link()
        if link is None:
            return None
        child, parent, role = link.child, link.parent, link.role
        join = (f"FROM {quote(child.name)} AS T1 JOIN {quote(parent.name)} AS T2 "
                f"ON {self._on(link, 'T1', 'T2')}")
        shape = self.choice(["pair", "filter_parent", "filter_child", "count"])
        if shape == "pair":
            mine, theirs = self.shown(child)[:1], self.shown(parent)[:1]
            if not mine or not theirs:
                return None
            question = self.choice([
                f"Show the {mine[0].phrase} of each {child.singular} together with the {theirs[0].phrase} "
                f"of its {role}.",
                f"For every {child.singular}, list its {mine[0].phrase} and the {theirs[0].phrase} of its "
                f"{role}.",
            ])
            return question, f"SELECT T1.{quote(mine[0].name)}, T2.{quote(theirs[0].name)} {join}"
        if shape == "filter_parent":
            mine = self.shown(child)
            cond = self.condition(self.choice(parent.attributes()), alias="T2.")
            if not mine or cond is None:
                return None
            question = self.choice([
                f"List the {self.say_list(mine)} of {child.plural} whose {role} has {cond.has}.",
                f"What are the {self.say_list(mine)} of the {child.plural} whose {role}'s {cond.clause}?",
            ])
            return question, f"SELECT {self.sql_list(mine, 'T1.')} {join} WHERE {cond.sql}"
        if shape == "filter_child":
            theirs = self.shown(parent)
            if not child.attributes() or not theirs:
                return None
            cond = self.condition(self.choice(child.attributes()), alias="T1.")
            if cond is None:
                return None
            question = self.choice([
                f"What are the distinct {self.say_list(theirs)} of {plural(role)} of {child.plural} "
                f"{self.where(cond)}?",
                f"Find the {self.say_list(theirs)} of every {role} that has {_article(child.singular)} "
                f"{self.where(cond)}.",
            ])
            return question, f"SELECT DISTINCT {self.sql_list(theirs, 'T2.')} {join} WHERE {cond.sql}"
        label = parent.label or self.choice(parent.attributes())
        question = self.choice([
            f"How many {child.plural} does each {role} have? Show the {role}'s {label.phrase} and the count.",
            f"For each {role}, give its {label.phrase} and the number of {child.plural}.",
        ])
        return question, (f"SELECT T2.{quote(label.name)}, COUNT(*) {join} "
                          f"GROUP BY T2.{quote(link.ref.name)}")

    def join_aggregate(self):
        link = self.link()
        if link is None or not link.child.attributes("number") or not link.parent.attributes():
            return None
        column = self.choice(link.child.attributes("number"))
        func = self.choice(list(self._AGGREGATES))
        word = self.choice(self._AGGREGATES[func])
        cond = self.condition(self.choice(link.parent.attributes()), alias="T2.")
        if cond is None:
            return None
        children = link.child.plural
        question = self.choice([
            f"What is the {word} {column.phrase} of {children} whose {link.role} has {cond.has}?",
            f"Find the {word} {column.phrase} over all {children} of {plural(link.role)} {self.where(cond)}.",
        ])
        return question, (f"SELECT {func}(T1.{quote(column.name)}) FROM {quote(link.child.name)} AS T1 "
                          f"JOIN {quote(link.parent.name)} AS T2 ON {self._on(link, 'T1', 'T2')} "
                          f"WHERE {cond.sql}")

    def join_group_order(self):
        link = self.link()
        if link is None:
            return None
        label = link.parent.label or self.choice(link.parent.attributes())
        most = self.rng.random() < 0.75
        word = "most" if most else "fewest"
        question = self.choice([
            f"Which {link.role} has the {word} {link.child.plural}? Give its {label.phrase}.",
            f"What is the {label.phrase} of the {link.role} with the {word} {link.child.plural}?",
        ])
        return question, (f"SELECT T2.{quote(label.name)} FROM {quote(link.child.name)} AS T1 "
                          f"JOIN {quote(link.parent.name)} AS T2 "
                          f"ON {self._on(link, 'T1', 'T2')} GROUP BY T2.{quote(link.ref.name)} "
                          f"ORDER BY COUNT(*) {'DESC' if most else 'ASC'} LIMIT 1")

    def _two_hop_paths(self) -> list[tuple[TableProfile, Link, TableProfile, Link, TableProfile, str]]:
        """(A, link A-B, B, link B-C, C, shape): chains A->B->C and bridges A<-B->C over distinct tables."""
        paths = []
        for first in self.profile.links:
            for second in self.profile.links:
                if first is second:
                    continue
                distinct_tables = len({first.child.name, first.parent.name, second.parent.name}) == 3
                if first.parent is second.child and distinct_tables:
                    paths.append((first.child, first, first.parent, second, second.parent, "chain"))
                if first.child is second.child and first.parent is not second.parent \
                        and first.child not in (first.parent, second.parent):
                    paths.append((first.parent, first, first.child, second, second.parent, "bridge"))
        return paths

    def join_two_hops(self):
        path = self.choice(self._two_hop_paths())
        if path is None:
            return None
        a, first, b, second, c, shape = path
        if shape == "chain":   # a.fk -> b, b.fk -> c
            on = f"{self._on(first, 'T1', 'T2')} JOIN {quote(c.name)} AS T3 ON {self._on(second, 'T2', 'T3')}"
        else:                  # b.fk -> a, b.fk -> c
            on = f"{self._on(first, 'T2', 'T1')} JOIN {quote(c.name)} AS T3 ON {self._on(second, 'T2', 'T3')}"
        join = f"FROM {quote(a.name)} AS T1 JOIN {quote(b.name)} AS T2 ON {on}"
        shown, filtered = (c, a) if self.rng.random() < 0.5 else (a, c)
        shown_alias, filtered_alias = ("T3.", "T1.") if shown is c else ("T1.", "T3.")
        cols = self.shown(shown)[:1]
        if not cols or not filtered.attributes():
            return None
        cond = self.condition(self.choice(filtered.attributes()), alias=filtered_alias)
        if cond is None:
            return None
        if self.rng.random() < 0.3:
            question = self.choice([
                f"How many different {plural(shown.singular)} are linked through {b.plural} to "
                f"{filtered.plural} {self.where(cond)}?",
                f"Count the distinct {shown.plural} connected via {b.plural} to {filtered.plural} "
                f"{self.where(cond)}.",
            ])
            key = shown.primary_key or cols[0]
            return question, f"SELECT COUNT(DISTINCT {shown_alias}{quote(key.name)}) {join} WHERE {cond.sql}"
        what = cols[0].phrase
        question = self.choice([
            f"What are the distinct {plural(what)} of {shown.plural} linked through {b.plural} to "
            f"{filtered.plural} {self.where(cond)}?",
            f"For {filtered.plural} {self.where(cond)}, list the different {plural(what)} of the related "
            f"{shown.plural} (via {b.plural}).",
            f"Find the {what} of every {shown.singular} connected by {b.plural} to "
            f"{_article(filtered.singular)} {self.where(cond)}.",
        ])
        return question, f"SELECT DISTINCT {shown_alias}{quote(cols[0].name)} {join} WHERE {cond.sql}"

    # --- nested queries ------------------------------------------------------------------------------------

    def in_subquery(self):
        link = self.link(allow_self=False)
        if link is None or not link.child.attributes():
            return None
        cols = self.shown(link.parent)
        cond = self.condition(self.choice(link.child.attributes()))
        if not cols or cond is None:
            return None
        parents, child = link.parent.plural, link.child
        question = self.choice([
            f"List the {self.say_list(cols)} of {parents} that have at least one {child.singular} "
            f"{self.where(cond)}.",
            f"Which {parents} have {child.plural} {self.where(cond)}? Give their {self.say_list(cols)}.",
        ])
        return question, (f"SELECT {self.sql_list(cols)} FROM {quote(link.parent.name)} "
                          f"WHERE {quote(link.ref.name)} IN "
                          f"(SELECT {quote(link.fk.name)} FROM {quote(child.name)} WHERE {cond.sql})")

    def not_in_subquery(self):
        link = self.link(allow_self=False)
        if link is None:
            return None
        cols = self.shown(link.parent)
        if not cols:
            return None
        parents, child = link.parent.plural, link.child
        inner = f"SELECT {quote(link.fk.name)} FROM {quote(child.name)}"
        if child.attributes() and self.rng.random() < 0.6:
            cond = self.condition(self.choice(child.attributes()))
            if cond is None:
                return None
            inner += f" WHERE {cond.sql}"
            question = self.choice([
                f"List the {self.say_list(cols)} of {parents} that have no {child.singular} "
                f"{self.where(cond)}.",
                f"Which {parents} do not have any {child.plural} {self.where(cond)}? Show their "
                f"{self.say_list(cols)}.",
            ])
        else:
            question = self.choice([
                f"Which {parents} have no {child.plural}? List their {self.say_list(cols)}.",
                f"Show the {self.say_list(cols)} of {parents} without any {child.singular}.",
                f"Find the {self.say_list(cols)} of {parents} that never appear in {child.plural}.",
            ])
        return question, (f"SELECT {self.sql_list(cols)} FROM {quote(link.parent.name)} "
                          f"WHERE {quote(link.ref.name)} NOT IN ({inner})")

    def scalar_subquery(self):
        found = self.table_with(lambda t: [c for c in t.attributes("number") if c.comparable])
        if not found:
            return None
        table, numbers = found
        column = self.choice(numbers)
        cols = self.shown(table, exclude=column)
        if not cols:
            return None
        what, T, n = self.say_list(cols), table.plural, column.phrase
        c, t = quote(column.name), quote(table.name)
        shape = self.choice(["above_avg", "below_avg", "equals_max", "above_filtered_avg"])
        if shape == "above_avg":
            question = self.choice([f"Which {T} have {_article(n)} above the average? Give their {what}.",
                                    f"List the {what} of {T} whose {n} is greater than the average {n}."])
            return question, f"SELECT {self.sql_list(cols)} FROM {t} WHERE {c} > (SELECT AVG({c}) FROM {t})"
        if shape == "below_avg":
            question = self.choice([
                f"List the {what} of {T} with {_article(n)} below the average.",
                f"Which {T} have {_article(n)} lower than the average {n} of all {T}? Show their {what}.",
            ])
            return question, f"SELECT {self.sql_list(cols)} FROM {t} WHERE {c} < (SELECT AVG({c}) FROM {t})"
        if shape == "equals_max":
            func, word = self.choice([("MAX", "highest"), ("MIN", "lowest")])
            question = self.choice([
                f"What are the {what} of the {T} whose {n} equals the {word} {n}?",
                f"Show the {what} of every {table.singular} that has the {word} {n} of all {T}.",
            ])
            return question, (f"SELECT {self.sql_list(cols)} FROM {t} "
                              f"WHERE {c} = (SELECT {func}({c}) FROM {t})")
        cond = self.condition(self.choice([a for a in table.attributes() if a is not column] or [column]))
        if cond is None:
            return None
        question = self.choice([
            f"List the {what} of {T} whose {n} is greater than the average {n} of {T} {self.where(cond)}.",
            f"Which {T} have {_article(n)} above the average of the {T} {self.where(cond)}? Give their "
            f"{what}.",
        ])
        return question, (f"SELECT {self.sql_list(cols)} FROM {t} "
                          f"WHERE {c} > (SELECT AVG({c}) FROM {t} WHERE {cond.sql})")

    # --- set operations ------------------------------------------------------------------------------------

    def _two_conditions(self, table: TableProfile, alias: str = ""):
        columns = table.attributes()
        first, second = self.choice(columns), self.choice(columns)
        c1, c2 = self.condition(first, alias=alias), self.condition(second, alias=alias)
        if c1 is None or c2 is None or c1.sql == c2.sql:
            return None
        return c1, c2

    def set_operation(self, operator: str):
        use_link = self.profile.links and self.rng.random() < 0.4
        if use_link:
            link = self.link(allow_self=False)
            if link is None or not link.child.attributes():
                return None
            parent, child = link.parent, link.child
            label = parent.label or self.choice(parent.attributes())
            conds = self._two_conditions(child, alias="T1.")
            if conds is None:
                return None
            c1, c2 = conds
            part = (f"SELECT T2.{quote(label.name)} FROM {quote(child.name)} AS T1 "
                    f"JOIN {quote(parent.name)} AS T2 "
                    f"ON {self._on(link, 'T1', 'T2')} WHERE ")
            sql = f"{part}{c1.sql} {operator} {part}{c2.sql}"
            cl1, cl2 = c1.has, c2.has
            subject = f"{label.phrase} of the {plural(link.role)}"
            question = {
                "UNION": self.choice([
                    f"What is the {subject} that have {_article(child.singular)} with {cl1} or one with "
                    f"{cl2}?",
                    f"List the {subject} with some {child.singular} whose {c1.clause} or whose {c2.clause}.",
                ]),
                "INTERSECT": self.choice([
                    f"Which {plural(link.role)} have both {_article(child.singular)} with {cl1} and one "
                    f"with {cl2}? Give the {label.phrase}.",
                    f"Find the {subject} that have {child.plural} with {cl1} and also {child.plural} with "
                    f"{cl2}.",
                ]),
                "EXCEPT": self.choice([
                    f"Which {plural(link.role)} have {_article(child.singular)} with {cl1} but none with "
                    f"{cl2}? Give the {label.phrase}.",
                    f"List the {subject} with {child.plural} whose {c1.clause}, excluding those with "
                    f"{child.plural} whose {c2.clause}.",
                ]),
            }[operator]
            return question, sql
        table = self.choice(self.tables)
        cols = self.shown(table)[:1]
        conds = self._two_conditions(table)
        if not cols or conds is None:
            return None
        c1, c2 = conds
        what, T = cols[0].phrase, table.plural
        part = f"SELECT {quote(cols[0].name)} FROM {quote(table.name)} WHERE "
        sql = f"{part}{c1.sql} {operator} {part}{c2.sql}"
        question = {
            "UNION": self.choice([
                f"List the {what} of {T} whose {c1.clause} or whose {c2.clause}, without duplicates.",
                f"Show the {plural(what)} of {T} {self.where(c1)} together with those of {T} "
                f"{self.where(c2)}.",
            ]),
            "INTERSECT": self.choice([
                f"Which {plural(what)} belong both to {T} {self.where(c1)} and to {T} {self.where(c2)}?",
                f"Find the {plural(what)} shared by {T} {self.where(c1)} and {T} {self.where(c2)}.",
            ]),
            "EXCEPT": self.choice([
                f"List the {plural(what)} of {T} {self.where(c1)}, except those of {T} {self.where(c2)}.",
                f"Which {plural(what)} appear among {T} {self.where(c1)} but not among {T} {self.where(c2)}?",
            ]),
        }[operator]
        return question, sql

    def union(self):
        return self.set_operation("UNION")

    def intersect(self):
        return self.set_operation("INTERSECT")

    def except_(self):
        return self.set_operation("EXCEPT")

    def all(self) -> list[tuple[str, Callable[[], tuple[str, str] | None]]]:
        names = ["select_columns", "filter_equals", "filter_compare", "filter_like", "filter_between",
                 "filter_two_conditions", "count_rows", "aggregate", "aggregate_pair", "count_distinct",
                 "group_by", "group_having", "order_limit", "group_order_limit", "distinct", "join_one_hop",
                 "join_aggregate", "join_group_order", "join_two_hops",
                 "in_subquery", "not_in_subquery", "scalar_subquery", "union", "intersect", "except_"]
        return [(name, getattr(self, name)) for name in names]


# ---------------------------------------------------------------------------------------------------


def _meaningful(rows: list[tuple]) -> bool:
    """A result worth asking for: at least one row with at least one non-NULL value."""
    return any(any(value is not None for value in row) for row in rows)


def generate_pairs(schema: SchemaSnapshot, target: str | Path, n_pairs: int, seed: int,
                   max_attempts_per_pair: int = 20) -> list[dict]:
    """Up to `n_pairs` unique {"question", "sql"} pairs over the database at `target` (canonical SQLite SQL).

    Templates take turns in a seeded shuffled order so every construct the schema supports is
    represented; a template that keeps producing duplicates or failures is retired."""
    profile = profile_database(schema, target)
    if not any(t.attributes() for t in profile.tables):
        raise PipelineError(f"{schema.db_id}: no table with non-key columns and rows to ask questions about")
    rng = random.Random(seed)
    templates = _Templates(profile, rng)
    db = _Database(target)
    active = templates.all()
    misses = {name: 0 for name, _ in active}
    pairs: list[dict] = []
    seen_questions: set[str] = set()
    seen_sql: set[str] = set()  # both the SQL as built and its canonical form, to skip re-parsing repeats
    attempts = 0
    max_attempts = n_pairs * max_attempts_per_pair
    while len(pairs) < n_pairs and active and attempts < max_attempts:
        rng.shuffle(active)
        for name, template in list(active):
            if len(pairs) >= n_pairs:
                break
            attempts += 1
            candidate = template()
            pair = _checked(candidate, db, seen_questions, seen_sql)
            if pair is None:
                misses[name] += 1
                if misses[name] >= 50:
                    active.remove((name, template))
                continue
            misses[name] = 0
            pairs.append(pair)
            if len(pairs) % 500 == 0:
                log.info("%s: %d/%d synthetic pairs (%d attempts)", schema.db_id, len(pairs), n_pairs,
                         attempts)
    log.info("%s: generated %d synthetic pairs in %d attempts", schema.db_id, len(pairs), attempts)
    return pairs


def _checked(candidate: tuple[str, str] | None, db: _Database, seen_questions: set[str],
             seen_sql: set[str]) -> dict | None:
    """The pair in canonical form if it is new, parses, executes and returns something meaningful."""
    if candidate is None:
        return None
    question, sql = candidate
    question = _sentence(question)
    if question.lower() in seen_questions or sql in seen_sql:
        return None
    seen_sql.add(sql)
    try:
        # The canonical form of `to_canonical`: identifiers are already quoted only where SQLite needs it,
        # so one parse and print suffices (this runs thousands of times).
        canonical = parse_sql(sql).sql(CANONICAL_DIALECT)
        if canonical != sql and canonical in seen_sql:
            return None
        seen_sql.add(canonical)
        rows = db.rows(canonical, max_rows=CHECK_ROWS)
    except SQLError as exc:
        log.debug("dropped generated SQL %r: %s", sql, exc)
        return None
    if not _meaningful(rows):
        return None
    seen_questions.add(question.lower())
    return {"question": question, "sql": canonical}
