"""Database targets: a target is either a SQLite file path or a SQLAlchemy URL (postgresql://...).

`data/ingested/databases.json` maps each db_id to its target; SQLite paths are stored relative to
`data/ingested` so the folder can move (DVC cache, another machine), URLs are stored as given."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pipelines.common.errors import PipelineError
from pipelines.common.io import read_json, write_json
from pipelines.common.paths import DATABASES_INDEX, INGESTED

# SQLAlchemy backend name -> sqlglot dialect name, for the backends people point this at.
_SQLGLOT_DIALECTS = {
    "sqlite": "sqlite",
    "postgresql": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mssql": "tsql",
    "oracle": "oracle",
    "duckdb": "duckdb",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
}


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and "://" in target


def mask_url(target: str | Path) -> str:
    """The target as it may appear in logs and error messages: any password replaced by ***."""
    if not is_url(target):
        return str(target)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(str(target)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def without_password(target: str) -> str:
    """The URL as it may be stored in an artifact: no password (libpq-based drivers read it from
    PGPASSWORD or ~/.pgpass at connect time)."""
    from sqlalchemy.engine import make_url

    return make_url(target)._replace(password=None).render_as_string(hide_password=False)


def backend(target: str | Path) -> str:
    """SQLAlchemy backend name of a target (`sqlite`, `postgresql`, ...)."""
    if not is_url(target):
        return "sqlite"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(str(target)).get_backend_name()
    except ArgumentError as exc:
        raise PipelineError(f"{mask_url(target)}: not a valid SQLAlchemy URL: {exc}") from exc


def sqlglot_dialect(target: str | Path) -> str:
    """The sqlglot dialect SQL must be written in to run on `target`."""
    name = backend(target)
    if name not in _SQLGLOT_DIALECTS:
        raise PipelineError(f"{mask_url(target)}: unsupported database backend {name!r} "
                            f"(supported: {', '.join(sorted(_SQLGLOT_DIALECTS))})")
    return _SQLGLOT_DIALECTS[name]


def connectable_url(target: str) -> str:
    """The URL with an explicit driver where the backend default is not installed: SQLAlchemy 2.1
    picks psycopg (3) for postgresql://, while the project pins psycopg2 (requirements.in)."""
    from sqlalchemy.engine import make_url

    url = make_url(target)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    return url.render_as_string(hide_password=False)


def sqlite_path(target: str | Path) -> Path | None:
    """The file behind a SQLite target (a plain path or a sqlite:/// URL), None for other backends."""
    if not is_url(target):
        return Path(target)
    from sqlalchemy.engine import make_url

    url = make_url(str(target))
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database) if url.database and url.database != ":memory:" else None


def readonly_sqlite_uri(path: str | Path) -> str:
    """A `file:` URI opening the SQLite file read-only (sqlite3 with uri=True); it never creates the file."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro"


def engine_for(target: str | Path, readonly: bool = True):
    """A SQLAlchemy engine for the target; SQLite files are opened read-only and must exist."""
    import sqlalchemy as sa

    path = sqlite_path(target)
    if path is not None:
        if not path.is_file():
            raise PipelineError(f"{path}: SQLite database file not found")
        if readonly:
            return sa.create_engine("sqlite://", creator=_sqlite_creator(path))
        return sa.create_engine(f"sqlite:///{path.resolve()}")
    try:
        return sa.create_engine(connectable_url(str(target)))
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise PipelineError(f"{mask_url(target)}: cannot use database URL: {exc}") from exc


def _sqlite_creator(path: Path):
    import sqlite3

    uri = readonly_sqlite_uri(path)
    return lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)


def check_reachable(target: str | Path) -> None:
    """Connect once, so an unreachable server is reported before any long work, password masked."""
    import sqlalchemy as sa

    engine = engine_for(target)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise PipelineError(f"{mask_url(target)}: cannot connect to database: {reason}") from exc
    finally:
        engine.dispose()


def read_index(path: str | Path = DATABASES_INDEX) -> dict[str, str]:
    index = read_json(path)
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        raise PipelineError(f"{path}: expected a JSON object mapping db_id to a target string")
    return index


def write_index(index: dict[str, str], path: str | Path = DATABASES_INDEX) -> None:
    write_json(path, index)


def resolve(db_id: str, index_path: str | Path = DATABASES_INDEX) -> str:
    """The connectable target of `db_id`: an absolute SQLite path, or the URL as recorded."""
    index_path = Path(index_path)
    index = read_index(index_path)
    if db_id not in index:
        known = ", ".join(sorted(index)[:10]) + (" ..." if len(index) > 10 else "")
        raise PipelineError(f"{index_path}: unknown db_id {db_id!r} (known: {known or 'none'})")
    target = index[db_id]
    if is_url(target):
        return target
    # Relative paths are relative to the folder holding databases.json (data/ingested by default).
    return str((index_path.parent / target).resolve())


def relative_target(path: Path, root: Path = INGESTED) -> str:
    """How a SQLite file under `root` is recorded in databases.json."""
    return path.relative_to(root).as_posix()
