"""Schema snapshot of one database: tables, columns (type, key, nullability, sample values) and
foreign keys, in the JSON shape documented in docs/architecture.md. Every stage that needs to know
what a database looks like (serialization, validation, serving) reads this, never the database."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.common.errors import PipelineError, describe_validation_error
from pipelines.common.io import write_text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Column(_Model):
    name: str
    type: str = ""
    primary_key: bool = False
    nullable: bool = True
    samples: list[str] = Field(default_factory=list)


class Table(_Model):
    name: str
    columns: list[Column]

    def column(self, name: str) -> Column | None:
        lowered = name.lower()
        return next((c for c in self.columns if c.name.lower() == lowered), None)


class ForeignKey(_Model):
    table: str
    column: str
    ref_table: str
    ref_column: str


class SchemaSnapshot(_Model):
    db_id: str
    dialect: str = "sqlite"
    tables: list[Table]
    foreign_keys: list[ForeignKey] = Field(default_factory=list)

    def table(self, name: str) -> Table | None:
        """Look a table up by name the way SQL does: case-insensitively."""
        lowered = name.lower()
        return next((t for t in self.tables if t.name.lower() == lowered), None)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SchemaSnapshot:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: schema snapshot not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise PipelineError(f"{path}: not a schema snapshot: {describe_validation_error(exc)}") from exc


def load(path: str | Path) -> SchemaSnapshot:
    return SchemaSnapshot.load(path)


def _sample_values(connection, table: str, column: str, limit: int) -> list[str]:
    """A few distinct non-null values, as the driver returns them (no SQLAlchemy type conversion:
    benchmark data has dates such as '1975-8-1' that a DATETIME column processor would reject)."""
    import sqlalchemy as sa

    if limit <= 0:
        return []
    quote = connection.dialect.identifier_preparer.quote
    query = (f"SELECT DISTINCT {quote(column)} FROM {quote(table)} WHERE {quote(column)} IS NOT NULL "
             f"ORDER BY 1 LIMIT {int(limit)}")
    try:
        values = [row[0] for row in connection.exec_driver_sql(query)]
    except sa.exc.DBAPIError:
        # Some types cannot be ordered (e.g. PostgreSQL json); samples are a nicety, not a must.
        connection.rollback()
        return []
    return [v.hex() if isinstance(v, bytes) else str(v) for v in values]


def introspect(target: str | Path, db_id: str, sample_values: int = 3) -> SchemaSnapshot:
    """Snapshot a live database (a SQLite file path or any SQLAlchemy URL) via SQLAlchemy inspection.
    For URLs with a schema search path (PostgreSQL), the default schema of the connection is read.
    `dialect` is the sqlglot dialect SQL must be written in for this database."""
    import sqlalchemy as sa

    from pipelines.common.databases import engine_for, mask_url, sqlglot_dialect

    engine = engine_for(target)
    tables: list[Table] = []
    foreign_keys: list[ForeignKey] = []
    try:
        with engine.connect() as connection, warnings.catch_warnings():
            # MySQL-style display widths such as INTEGER(11) make SQLAlchemy's SQLite reflection warn
            # for every such column; the reflected type is right either way.
            warnings.filterwarnings("ignore", message="Could not instantiate type .* reflected arguments")
            inspector = sa.inspect(connection)
            for table_name in inspector.get_table_names():
                pk = set(inspector.get_pk_constraint(table_name).get("constrained_columns") or [])
                columns = [
                    Column(
                        name=col["name"],
                        type=str(col["type"]),
                        primary_key=col["name"] in pk,
                        nullable=bool(col.get("nullable", True)) and col["name"] not in pk,
                        samples=_sample_values(connection, table_name, col["name"], sample_values),
                    )
                    for col in inspector.get_columns(table_name)
                ]
                tables.append(Table(name=table_name, columns=columns))
                for fk in inspector.get_foreign_keys(table_name):
                    for column, ref_column in zip(fk["constrained_columns"], fk["referred_columns"]):
                        foreign_keys.append(
                            ForeignKey(table=table_name, column=column,
                                       ref_table=fk["referred_table"], ref_column=ref_column)
                        )
    except sa.exc.SQLAlchemyError as exc:
        raise PipelineError(f"{mask_url(str(target))}: cannot introspect database: {exc.__class__.__name__}: "
                            f"{str(exc.orig if getattr(exc, 'orig', None) else exc).strip()}") from exc
    finally:
        engine.dispose()
    return SchemaSnapshot(db_id=db_id, dialect=sqlglot_dialect(target), tables=tables,
                          foreign_keys=foreign_keys)
