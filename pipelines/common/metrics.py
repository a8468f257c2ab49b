"""Text-to-SQL metrics: execution accuracy, exact-set match and Spider hardness, on the sqlglot AST.

Execution accuracy (EX), decided here and used everywhere:
- Predicted and gold SQL both run read-only through `execute_readonly` (time and row limits).
- A predicted query that does not parse, is not a single SELECT, errors or times out is wrong.
  A gold query that fails is not scored at all (`GOLD_ERROR`): callers exclude it and count it apart.
- Results are compared as multisets of rows (duplicates count), or as ordered lists when the gold query has
  a top-level ORDER BY. Column names are ignored and column ORDER is ignored too, as in Spider's test-suite
  evaluation: the prediction is right if some permutation of its columns gives the gold result
  (`SELECT name, age` vs `SELECT age, name` match). The column count must be equal, except that two
  empty results always match (as in the test-suite evaluation).
- Values are compared after normalization: 1 == 1.0 == True; floats rounded to 6 decimals (so SQLite's
  float noise in AVG/SUM does not decide); strings are compared exactly (case matters, as in the database).
- A result over `max_rows` is compared on its first `max_rows` rows; both sides must be over the limit.

Exact-set match (EM): Spider's "exact set match without values". Both queries are parsed, identifiers
lower-cased, table aliases replaced by table names, column aliases dropped, unqualified columns attributed to
their table (the only table in scope, or the one table whose schema has that column when `schema` is given),
and literals (including the LIMIT count) replaced by a placeholder unless `with_values=True`. Then
components compare as Spider does: SELECT items, FROM tables, GROUP BY items and AND/OR operands as multisets
(order-insensitive), ORDER BY as a list, a = b / a < b normalized symmetrically, UNION/INTERSECT operands
unordered, EXCEPT ordered. As in Spider, JOIN ... ON conditions are not compared (the tables are).

Hardness: Spider's `eval_hardness` (easy / medium / hard / extra) re-implemented on the sqlglot AST with the
same counting rules, quirks included (see `hardness`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlglot import exp

from pipelines.common.sql import SQLError, execute_readonly, parse_sql

CORRECT = "correct"
WRONG = "wrong"
PRED_ERROR = "pred_error"
GOLD_ERROR = "gold_error"

HARDNESS_LEVELS = ("easy", "medium", "hard", "extra")

# More column permutations than this are not searched (only happens with many columns of equal values).
_MAX_PERMUTATIONS = 5000


# --- execution accuracy ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Execution:
    """What running one query gave: rows, or the error that stopped it."""

    rows: tuple[tuple[Any, ...], ...] = ()
    n_columns: int = 0
    truncated: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_query(target: str | Path, sql: str, *, timeout_s: float, max_rows: int) -> Execution:
    """Run untrusted SQL read-only; every SQL problem becomes `Execution.error` instead of an exception."""
    try:
        result = execute_readonly(target, sql, timeout_s=timeout_s, max_rows=max_rows)
    except SQLError as exc:
        return Execution(error=f"{type(exc).__name__}: {exc}")
    return Execution(rows=tuple(result.rows), n_columns=len(result.columns), truncated=result.truncated)


def has_top_level_order_by(sql: str) -> bool:
    """Whether the outermost query sorts its result (then row order is part of the answer)."""
    try:
        tree = parse_sql(sql)
    except SQLError:
        return False
    while isinstance(tree, exp.Subquery):
        tree = tree.this
    return tree.args.get("order") is not None


def normalize_value(value: Any) -> Hashable:
    """A value in the form results are compared in: numbers unified (1 == 1.0 == True), floats rounded."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        rounded = round(value, 6)
        return int(rounded) if rounded.is_integer() else rounded
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (int, str)) or value is None:
        return value
    return str(value)  # dates, UUIDs, ... from other backends compare by their text


def results_match(predicted: Sequence[Sequence[Any]], gold: Sequence[Sequence[Any]], *,
                  ordered: bool) -> bool:
    """Same rows (multiset, or list when `ordered`) under some permutation of the predicted columns."""
    pred_rows = [tuple(normalize_value(v) for v in row) for row in predicted]
    gold_rows = [tuple(normalize_value(v) for v in row) for row in gold]
    if not pred_rows and not gold_rows:
        return True
    if len(pred_rows) != len(gold_rows):
        return False
    n_columns = len(gold_rows[0])
    if any(len(r) != n_columns for r in pred_rows) or any(len(r) != n_columns for r in gold_rows):
        return False

    def column(rows: list[tuple], j: int) -> list:
        return [r[j] for r in rows]

    def signature(values: list) -> Hashable:
        return tuple(values) if ordered else frozenset(Counter(values).items())

    gold_signatures = [signature(column(gold_rows, j)) for j in range(n_columns)]
    pred_signatures = [signature(column(pred_rows, i)) for i in range(n_columns)]
    # For each gold column, the predicted columns holding the same values: the only possible partners.
    candidates = [[i for i in range(n_columns) if pred_signatures[i] == gold_signatures[j]]
                  for j in range(n_columns)]
    if any(not c for c in candidates):
        return False
    gold_multiset = None if ordered else Counter(gold_rows)
    for tried, permutation in enumerate(_assignments(candidates)):
        if tried >= _MAX_PERMUTATIONS:
            return False
        permuted = [tuple(row[i] for i in permutation) for row in pred_rows]
        if (permuted == gold_rows) if ordered else (Counter(permuted) == gold_multiset):
            return True
    return False


def _assignments(candidates: list[list[int]]) -> Iterable[tuple[int, ...]]:
    """Every bijection gold column j -> predicted column from candidates[j] (depth-first)."""
    chosen: list[int] = []
    used: set[int] = set()

    def extend(j: int):
        if j == len(candidates):
            yield tuple(chosen)
            return
        for i in candidates[j]:
            if i not in used:
                chosen.append(i)
                used.add(i)
                yield from extend(j + 1)
                used.discard(i)
                chosen.pop()

    yield from extend(0)


def execution_verdict(predicted: Execution, gold: Execution, *, ordered: bool) -> str:
    """CORRECT / WRONG / PRED_ERROR / GOLD_ERROR for one prediction given both executions."""
    if not gold.ok:
        return GOLD_ERROR
    if not predicted.ok:
        return PRED_ERROR
    if predicted.truncated != gold.truncated:
        return WRONG
    if (predicted.rows or gold.rows) and predicted.n_columns != gold.n_columns:
        return WRONG
    return CORRECT if results_match(predicted.rows, gold.rows, ordered=ordered) else WRONG


def execution_match(predicted_sql: str, gold_sql: str, target: str | Path, *,
                    timeout_s: float = 5.0, max_rows: int = 10_000) -> str:
    """Run both queries on `target` and compare their results; returns one of the verdict constants."""
    gold = run_query(target, gold_sql, timeout_s=timeout_s, max_rows=max_rows)
    if not gold.ok:
        return GOLD_ERROR
    predicted = run_query(target, predicted_sql, timeout_s=timeout_s, max_rows=max_rows)
    return execution_verdict(predicted, gold, ordered=has_top_level_order_by(gold_sql))


def is_valid_sql(predicted: Execution) -> bool:
    """Valid-SQL rate counts predictions that parse as a single SELECT and execute without error."""
    return predicted.ok


# --- exact-set match -------------------------------------------------------------------------------

_PLACEHOLDER = "?"
_COMMUTATIVE = (exp.EQ, exp.NEQ)
# a < b is written b > a, so both spellings of the same comparison look alike.
_MIRRORED = {exp.LT: exp.GT, exp.LTE: exp.GTE}
_ORDERING = (exp.GT, exp.GTE)


class _Scope:
    """Tables visible in one SELECT: alias -> table name, and the tables for unqualified columns."""

    def __init__(self, select: exp.Select, schema: Mapping[str, set[str]] | None, parent: _Scope | None):
        self.parent = parent
        self.schema = schema
        self.aliases: dict[str, str] = {}
        self.tables: list[str] = []
        for source in _sources(select):
            if isinstance(source, exp.Table):
                name = source.name.lower()
                self.tables.append(name)
                self.aliases[(source.alias or source.name).lower()] = name
            elif source.alias:
                self.aliases[source.alias.lower()] = source.alias.lower()

    def table_of(self, column: exp.Column) -> str:
        qualifier = column.table.lower()
        if qualifier:
            scope: _Scope | None = self
            while scope is not None:
                if qualifier in scope.aliases:
                    return scope.aliases[qualifier]
                scope = scope.parent
            return qualifier
        if len(self.tables) == 1:
            return self.tables[0]
        if self.schema is not None:
            owners = [t for t in self.tables if column.name.lower() in self.schema.get(t, set())]
            if len(owners) == 1:
                return owners[0]
        return ""


def _sources(select: exp.Select) -> list[exp.Expression]:
    from_ = select.args.get("from_") or select.args.get("from")
    sources = [from_.this] if from_ is not None else []
    sources += [join.this for join in select.args.get("joins") or []]
    return sources


def canonical_form(sql: str, *, schema: Mapping[str, Iterable[str]] | None = None,
                   with_values: bool = False) -> Hashable:
    """A hashable form of the query that is equal for queries exact-set match considers equal.
    Raises SQLParseError when the SQL does not parse."""
    lowered = None if schema is None else {t.lower(): {c.lower() for c in cols} for t, cols in schema.items()}
    return _canon_query(parse_sql(sql), lowered, None, with_values)


def exact_set_match(predicted_sql: str, gold_sql: str, *, schema: Mapping[str, Iterable[str]] | None = None,
                    with_values: bool = False) -> bool:
    """Spider-style exact-set match (values ignored by default); False when either side does not parse."""
    try:
        return canonical_form(predicted_sql, schema=schema, with_values=with_values) == canonical_form(
            gold_sql, schema=schema, with_values=with_values)
    except SQLError:
        return False


def _canon_query(node: exp.Expression, schema, parent: _Scope | None, with_values: bool) -> Hashable:
    while isinstance(node, exp.Subquery):
        node = node.this
    if isinstance(node, exp.SetOperation):
        left = _canon_query(node.this, schema, parent, with_values)
        right = _canon_query(node.expression, schema, parent, with_values)
        operands = (left, right) if isinstance(node, exp.Except) else tuple(sorted((left, right), key=repr))
        tail = _canon_order_limit(node, None, schema, with_values)
        return (type(node).__name__.lower(), bool(node.args.get("distinct")), operands, tail)
    if not isinstance(node, exp.Select):
        return ("other", _canon_expr(node, None, schema, with_values))
    scope = _Scope(node, schema, parent)
    canon = lambda e: _canon_expr(e, scope, schema, with_values)
    select_items = tuple(sorted(canon(e.this if isinstance(e, exp.Alias) else e) for e in node.expressions))
    tables = tuple(sorted(
        source.name.lower() if isinstance(source, exp.Table)
        else repr(_canon_query(source, schema, scope, with_values))
        for source in _sources(node)))
    where = node.args.get("where")
    group = node.args.get("group")
    having = node.args.get("having")
    return (
        "select",
        bool(node.args.get("distinct")),
        select_items,
        tables,
        _canon_condition(where.this, scope, schema, with_values) if where is not None else None,
        tuple(sorted(canon(e) for e in group.expressions)) if group is not None else (),
        _canon_condition(having.this, scope, schema, with_values) if having is not None else None,
        _canon_order_limit(node, scope, schema, with_values),
    )


def _canon_order_limit(node: exp.Expression, scope: _Scope | None, schema, with_values: bool) -> Hashable:
    order = node.args.get("order")
    limit = node.args.get("limit")
    aliases = {}
    if isinstance(node, exp.Select):
        aliases = {e.alias.lower(): e.this for e in node.expressions if isinstance(e, exp.Alias)}
    items = []
    for ordered in order.expressions if order is not None else []:
        key = ordered.this
        # ORDER BY an output alias means ORDER BY the aliased expression.
        if isinstance(key, exp.Column) and not key.table and key.name.lower() in aliases:
            key = aliases[key.name.lower()]
        items.append((_canon_expr(key, scope, schema, with_values), bool(ordered.args.get("desc"))))
    if limit is None:
        limit_value = None
    else:
        limit_value = limit.expression.sql() if with_values and limit.expression is not None else _PLACEHOLDER
    return tuple(items), limit_value


def _canon_condition(node: exp.Expression, scope: _Scope | None, schema, with_values: bool) -> Hashable:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, (exp.And, exp.Or)):
        kind = type(node)
        operands = []
        stack = [node]
        while stack:  # flatten a AND (b AND c) into {a, b, c}
            current = stack.pop()
            while isinstance(current, exp.Paren):
                current = current.this
            if isinstance(current, kind):
                stack += [current.this, current.expression]
            else:
                operands.append(_canon_condition(current, scope, schema, with_values))
        return (kind.__name__.lower(), tuple(sorted(operands, key=repr)))
    if isinstance(node, exp.Not):
        return ("not", _canon_condition(node.this, scope, schema, with_values))
    if isinstance(node, _COMMUTATIVE):
        sides = sorted((_canon_expr(node.this, scope, schema, with_values),
                        _canon_expr(node.expression, scope, schema, with_values)))
        return (type(node).__name__.lower(), tuple(sides))
    if type(node) in _MIRRORED:
        mirrored = _MIRRORED[type(node)]
        return (mirrored.__name__.lower(), _canon_expr(node.expression, scope, schema, with_values),
                _canon_expr(node.this, scope, schema, with_values))
    if isinstance(node, _ORDERING):
        return (type(node).__name__.lower(), _canon_expr(node.this, scope, schema, with_values),
                _canon_expr(node.expression, scope, schema, with_values))
    return ("expr", _canon_expr(node, scope, schema, with_values))


def _canon_expr(node: exp.Expression, scope: _Scope | None, schema, with_values: bool) -> str:
    """One expression as text after resolving tables, dropping aliases and (optionally) values."""

    def rewrite(current: exp.Expression) -> exp.Expression:
        if isinstance(current, (exp.Subquery, exp.Select, exp.SetOperation)):
            nested = _canon_query(current, schema, scope, with_values)
            return exp.Var(this=f"<{nested!r}>")
        if isinstance(current, exp.Column) and scope is not None and not isinstance(current.this, exp.Star):
            table = scope.table_of(current)
            return exp.column(current.name.lower(), table=table or None)
        if isinstance(current, exp.Identifier):
            return exp.to_identifier(current.this.lower())
        if isinstance(current, exp.Literal) and not with_values:
            return exp.Var(this=_PLACEHOLDER)
        if isinstance(current, exp.Alias):
            return current.this
        return current

    return node.copy().transform(rewrite).sql(dialect="sqlite").lower()


# --- Spider hardness -------------------------------------------------------------------------------

_AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max)


@dataclass(frozen=True)
class _Condition:
    """One Spider `cond_unit`: a leaf predicate with its NOT flag."""

    node: exp.Expression
    negated: bool


def _flatten_condition(node: exp.Expression | None) -> tuple[list[_Condition], list[str]]:
    """A WHERE/HAVING/ON tree as Spider's alternating list: leaf conditions and the and/or between them."""
    conditions: list[_Condition] = []
    connectors: list[str] = []

    def visit(current: exp.Expression):
        while isinstance(current, exp.Paren):
            current = current.this
        if isinstance(current, (exp.And, exp.Or)):
            visit(current.this)
            connectors.append("and" if isinstance(current, exp.And) else "or")
            visit(current.expression)
        elif isinstance(current, exp.Not):
            inner = current.this
            while isinstance(inner, exp.Paren):
                inner = inner.this
            conditions.append(_Condition(inner, True))
        else:
            conditions.append(_Condition(current, False))

    if node is not None:
        visit(node)
    return conditions, connectors


def _own_nodes(node: exp.Expression, kinds) -> list[exp.Expression]:
    """Nodes of `kinds` inside `node` that do not belong to a nested query."""
    found = []

    def visit(current: exp.Expression):
        for child in current.iter_expressions():
            if isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation)):
                continue
            if isinstance(child, kinds):
                found.append(child)
            visit(child)

    if isinstance(node, kinds):
        found.append(node)
    visit(node)
    return found


def _nested_queries(condition: _Condition) -> int:
    """Subqueries used as a condition's value(s) (Spider's val1 / val2 being a SQL dict)."""
    count = 0

    def visit(current: exp.Expression):
        nonlocal count
        for child in current.iter_expressions():
            if isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation)):
                count += 1
            else:
                visit(child)

    visit(condition.node)
    return count


def _has_aggregate(node: exp.Expression) -> bool:
    return bool(_own_nodes(node, _AGGREGATES))


def _leftmost_select(tree: exp.Expression) -> tuple[exp.Select | None, bool]:
    """Spider scores the left query of a set operation; the rest counts as one nested query."""
    is_set_operation = False
    while isinstance(tree, (exp.Subquery, exp.SetOperation)):
        is_set_operation = is_set_operation or isinstance(tree, exp.SetOperation)
        tree = tree.this
    return (tree if isinstance(tree, exp.Select) else None), is_set_operation


def hardness_counts(sql: str) -> tuple[int, int, int]:
    """Spider's (count_component1, count_component2, count_others) for one query."""
    select, is_set_operation = _leftmost_select(parse_sql(sql))
    if select is None:
        return 0, int(is_set_operation), 0
    join_conditions: list[_Condition] = []
    join_connectors: list[str] = []
    for join in select.args.get("joins") or []:
        conditions, connectors = _flatten_condition(join.args.get("on"))
        if join_conditions and conditions:
            join_connectors.append("and")  # Spider chains the ON clauses of successive joins with 'and'
        join_conditions += conditions
        join_connectors += connectors
    where = select.args.get("where")
    having = select.args.get("having")
    where_conditions, where_connectors = _flatten_condition(where.this if where is not None else None)
    having_conditions, having_connectors = _flatten_condition(having.this if having is not None else None)
    group = select.args.get("group")
    group_items = list(group.expressions) if group is not None else []
    order = select.args.get("order")
    order_items = [o.this for o in order.expressions] if order is not None else []

    # count_component1
    component1 = sum(x is not None for x in (where, group, order, select.args.get("limit")))
    component1 += max(len(_sources(select)) - 1, 0)
    connectors = join_connectors + where_connectors + having_connectors
    component1 += connectors.count("or")
    all_conditions = join_conditions + where_conditions + having_conditions
    component1 += sum(isinstance(c.node, (exp.Like, exp.ILike)) for c in all_conditions)

    # count_component2: nested queries in conditions, plus the set operation
    component2 = sum(_nested_queries(c) for c in all_conditions) + int(is_set_operation)

    # count_others. Spider's count_agg(units) tests unit[0] != 0, which for WHERE/HAVING cond_units is
    # the NOT flag, and for the raw HAVING list also counts each 'and'/'or' string: reproduced as is.
    aggregates = sum(_has_aggregate(e.this if isinstance(e, exp.Alias) else e) for e in select.expressions)
    aggregates += sum(c.negated for c in where_conditions)
    aggregates += sum(_has_aggregate(e) for e in group_items)
    # An ORDER BY val_unit has up to two col_units (a - b), each possibly aggregated.
    aggregates += sum(min(len(_own_nodes(e, _AGGREGATES)), 2) for e in order_items)
    aggregates += sum(c.negated for c in having_conditions) + len(having_connectors)
    others = int(aggregates > 1)
    others += int(len(select.expressions) > 1)
    others += int(len(where_conditions) > 1)
    others += int(len(group_items) > 1)
    return component1, component2, others


def hardness(sql: str) -> str:
    """Spider's difficulty level of a (gold) query. Raises SQLParseError when it does not parse."""
    component1, component2, others = hardness_counts(sql)
    if component1 <= 1 and others == 0 and component2 == 0:
        return "easy"
    if (others <= 2 and component1 <= 1 and component2 == 0) or (
            component1 <= 2 and others < 2 and component2 == 0):
        return "medium"
    if (others > 2 and component1 <= 2 and component2 == 0) or (
            2 < component1 <= 3 and others <= 2 and component2 == 0) or (
            component1 <= 1 and others == 0 and component2 <= 1):
        return "hard"
    return "extra"
