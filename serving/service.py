"""NL-to-SQL HTTP service (BentoML 1.4).

Endpoints (OpenAPI docs at `/docs`; BentoML's `/healthz`, `/livez`, `/readyz`, `/metrics` stay on):
- `POST /sql`    {question, db_id | schema}  -> {sql, model_version, latency_ms, ...}
- `POST /query`  {question, db_id}           -> the SQL run read-only on that database: {sql, columns, rows, truncated, ...}
- `POST /reload` admin: re-resolve the model alias now and swap to its current version if it changed
  (header `X-Admin-Token` required when NL2SQL_ADMIN_TOKEN is set). The same check also runs in the
  background every `serving.reload_interval_s` seconds, so a new champion is served without a restart.
- `POST /generate_batch` the adaptive-batching model endpoint the two above call (inputs already checked).

Configuration: params.yaml `serving` (path from NL2SQL_PARAMS), overridden by environment variables:
NL2SQL_MODEL (models:/<name>@<alias>, models:/<name>/<version> or a local export directory),
NL2SQL_DATABASES (databases.json mapping db_id -> SQLite path or SQLAlchemy URL),
NL2SQL_MODEL_CACHE (where registry versions are downloaded), NL2SQL_BATCHING=0 (adaptive batching off),
MLFLOW_TRACKING_URI (the registry)."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import functools
import hmac
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from http import HTTPStatus
from typing import Annotated, Any

import bentoml
from bentoml.exceptions import BentoMLException, NotFound, ServiceUnavailable, UnprocessableEntity
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.common import databases, paths
from pipelines.common.errors import PipelineError
from pipelines.common.candidates import answer_candidates, model_inputs
from pipelines.common.generate import first_executable
from pipelines.common.model_io import load_for_generation
from pipelines.common.params import load_params
from pipelines.common.schema import SchemaSnapshot, introspect
from pipelines.common.sql import SQLError, SQLExecutionError, SQLTimeoutError, check_single_select

log = logging.getLogger("nl2sql.serving")

PARAMS = load_params(os.environ.get("NL2SQL_PARAMS", "params.yaml"))
SERVING = PARAMS.serving
MODEL_URI = os.environ.get("NL2SQL_MODEL") or SERVING.model
DATABASES_FILE = Path(os.environ.get("NL2SQL_DATABASES") or paths.DATABASES_INDEX)
MODEL_CACHE = Path(os.environ.get("NL2SQL_MODEL_CACHE") or Path.home() / ".cache" / "nl2sql" / "models")
BATCHING = os.environ.get("NL2SQL_BATCHING", "1").lower() not in ("0", "false", "off", "no")
ADMIN_TOKEN = os.environ.get("NL2SQL_ADMIN_TOKEN")
MAX_BATCH_SIZE = 16
# The batch window: a request waits at most this long for others to join its batch.
MAX_BATCH_LATENCY_MS = 20_000

# Defense in depth: the question goes to the model, never to a database, but a question carrying
# statements ("...; DROP TABLE x") is an attack or a mistake either way, and is refused up front.
# Plain English ("select the customers from Paris", "names -- and cities") stays allowed.
_SQL_KEYWORDS = r"(?:select|with|insert|update|delete|drop|alter|create|truncate|replace|attach|detach|pragma|" \
                r"grant|revoke|vacuum|begin|commit|rollback|exec|execute|copy|call|set)"
_SMUGGLED_SQL = re.compile(
    rf";\s*{_SQL_KEYWORDS}\b"                      # a second statement
    r"|/\*.*?\*/|--\s*$|'\s*--"                    # SQL comments hiding the rest of a line
    r"|\b(?:drop|truncate|alter|create)\s+(?:table|database|schema|index|view|trigger|user|role)\b"
    r"|\bdelete\s+from\b|\binsert\s+into\b|\bupdate\s+\w+\s+set\b|\battach\s+database\b"
    r"|\bpragma\s+\w+\s*[=(;]|\b(?:grant|revoke)\s+\w+\s+on\b",
    re.IGNORECASE | re.DOTALL,
)

Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=SERVING.max_question_chars)]
DbId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    question: Question = Field(
        description=f"The question in natural language (1 to {SERVING.max_question_chars} characters, no SQL).",
        examples=["How many customers live in Paris?"],
    )

    @field_validator("question")
    @classmethod
    def _no_sql_inside(cls, question: str) -> str:
        if _SMUGGLED_SQL.search(question):
            raise ValueError("the question contains SQL syntax (statements, ';' or comments); ask in plain language")
        return question


class SqlRequest(_Request):
    db_id: DbId | None = Field(
        None, description="A database known to the service (see databases.json); its schema is used. "
        "Give either db_id or schema.", examples=["shop"],
    )
    schema_: SchemaSnapshot | None = Field(
        None, alias="schema",
        description="An inline schema snapshot (db_id, dialect, tables with columns, foreign_keys), for a "
        "database the service does not know. Give either db_id or schema.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> SqlRequest:
        if (self.db_id is None) == (self.schema_ is None):
            raise ValueError("give exactly one of db_id or schema")
        return self


class QueryRequest(_Request):
    db_id: DbId = Field(description="The database to answer from (a key of databases.json).", examples=["shop"])


class GenerationItem(_Request):
    schema_json: str = Field(description="The schema snapshot (see /sql's schema) as a JSON string.")
    db_id: DbId | None = Field(None, description="The known database the schema belongs to, if any: with schema "
                               "linking its values are matched against the question, as in training.")

    @field_validator("schema_json")
    @classmethod
    def _is_schema_snapshot(cls, schema_json: str) -> str:
        try:
            SchemaSnapshot.model_validate_json(schema_json)
        except ValidationError as exc:
            raise ValueError(f"not a schema snapshot: {exc.errors()[0]['msg']}") from None
        return schema_json


class GenerationResult(BaseModel):
    candidates: list[str] = Field(description="Known examples' SQL, then beam outputs, in the order to try them.")
    origins: list[str] = Field(description='Where each candidate comes from: "model" (a beam) or "example".')
    model_version: str = Field(description="The model version that produced them.")


class SqlResponse(BaseModel):
    sql: str = Field(description="The generated query: one read-only SELECT, SQLite dialect (canonical).")
    model_version: str = Field(description="Registry version (or local directory) of the model that answered.")
    latency_ms: float = Field(description="Time spent in the service for this request, in milliseconds.")
    execution_guided: bool = Field(description="True when candidates were checked against the database.")
    origin: str = Field(description='"example" when the SQL is that of a known example similar to the question '
                                    '(serving.example_candidates), "model" when it is a beam of the model.')


class QueryResponse(SqlResponse):
    columns: list[str] = Field(description="Result column names.")
    rows: list[list[Any]] = Field(description="Result rows (at most serving.max_rows).")
    truncated: bool = Field(description="True when the result had more rows than returned.")
    row_count: int = Field(description="Number of rows returned.")


class ReloadResponse(BaseModel):
    model_version: str = Field(description="The version served after the check.")
    previous_version: str = Field(description="The version served before the check.")
    changed: bool = Field(description="Whether a new version was loaded and swapped in.")


class Forbidden(BentoMLException):
    error_code = HTTPStatus.FORBIDDEN


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    config: Any  # SerializationConfig
    version: str


def _registry_client():
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or PARAMS.tracking.uri)
    return MlflowClient()


def _load(uri: str) -> LoadedModel:
    """Load a local export directory, or the registry version `uri` points at (downloaded once), with its
    retrieval index built."""
    from pipelines.common.tracking import download_version, parse_model_uri, resolve_version

    ref = parse_model_uri(uri)
    if ref is None:
        model, tokenizer, config = load_for_generation(uri)
        version = f"local:{Path(uri).resolve().name}"
    else:
        client = _registry_client()
        registered = resolve_version(client, ref)
        model, tokenizer, config = load_for_generation(download_version(client, registered, MODEL_CACHE))
        version = str(registered.version)
    config.prepare_retrieval()
    return LoadedModel(model, tokenizer, config, version)


def _current_registry_version(uri: str) -> str | None:
    """The version an alias points at now (None for local directories and pinned versions)."""
    from pipelines.common.tracking import parse_model_uri, resolve_version

    ref = parse_model_uri(uri)
    if ref is None or ref.alias is None:
        return None
    return str(resolve_version(_registry_client(), ref).version)


def _json_value(value: Any) -> Any:
    """Database values as JSON: numbers, strings, booleans and null as they are; the rest as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


@bentoml.service(
    name="nl2sql",
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 256},
    # /sql and /query reach the batching queue through the service's own in-process client. BentoML
    # recycles that client's session every 100 requests / 300 s by closing it, which cuts the requests
    # still in flight on it ("Server disconnected" -> 500s under load). Recycling buys nothing for an
    # in-process connection, so it is effectively switched off.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class NL2SQL:
    def __init__(self) -> None:
        self._model = _load(MODEL_URI)
        self._reload_lock = threading.Lock()
        self._schemas: dict[str, SchemaSnapshot] = {}
        self._databases = self._read_databases()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_alias, name="nl2sql-reload", daemon=True)
        self._watcher.start()
        log.info("serving %s version %s (adaptive batching %s)", MODEL_URI, self._model.version,
                 "on" if BATCHING else "off")

    # --- model lifecycle -------------------------------------------------------------------------

    def _watch_alias(self) -> None:
        while not self._stop.wait(SERVING.reload_interval_s):
            try:
                self._reload()
            except Exception:  # a registry hiccup must not stop serving the current model
                log.exception("background model check failed; still serving version %s", self._model.version)

    def _reload(self) -> tuple[str, bool]:
        """Swap in the alias's current version if it changed; (previous version, changed)."""
        with self._reload_lock:
            previous = self._model.version
            current = _current_registry_version(MODEL_URI)
            if current is None or current == previous:
                return previous, False
            log.info("alias %s moved %s -> %s: loading", MODEL_URI, previous, current)
            # Loaded fully before the swap; requests in flight keep the model object they started with.
            self._model = _load(MODEL_URI)
            return previous, True

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()

    # --- databases and schemas -------------------------------------------------------------------

    def _read_databases(self) -> dict[str, str]:
        if not DATABASES_FILE.is_file():
            log.warning("%s not found: only inline schemas can be used", DATABASES_FILE)
            return {}
        return {db_id: databases.resolve(db_id, DATABASES_FILE) for db_id in databases.read_index(DATABASES_FILE)}

    def _target(self, db_id: str) -> str:
        if db_id not in self._databases:
            raise NotFound(f"unknown db_id {db_id!r}: not in the service's databases file")
        return self._databases[db_id]

    def _schema(self, db_id: str) -> SchemaSnapshot:
        if db_id not in self._schemas:
            snapshot = DATABASES_FILE.parent / paths.INGESTED_SCHEMAS.name / f"{db_id}.json"
            try:
                self._schemas[db_id] = (
                    SchemaSnapshot.load(snapshot) if snapshot.is_file()
                    else introspect(self._target(db_id), db_id,
                                    self._model.config.serialization.sample_values)
                )
            except PipelineError as exc:
                log.error("schema of %s unavailable: %s", db_id, exc)
                raise ServiceUnavailable(f"schema of database {db_id!r} is unavailable") from exc
        return self._schemas[db_id]

    # --- generation ------------------------------------------------------------------------------

    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_BATCH_LATENCY_MS)
    def generate_batch(self, items: list[GenerationItem]) -> list[GenerationResult]:
        """Beam candidates for already-checked (question, schema) pairs; adaptive batching groups
        concurrent requests into one `generate` call."""
        loaded = self._model  # one model for the whole batch, even if a reload swaps it meanwhile
        config = loaded.config
        schemas = [SchemaSnapshot.model_validate_json(item.schema_json) for item in items]
        inputs, nearest = model_inputs(
            config, loaded.tokenizer, [item.question for item in items], schemas, [item.db_id for item in items],
            [self._value_index(item.db_id, schema, config.serialization) for item, schema in zip(items, schemas)],
            [self._databases.get(item.db_id) for item in items], k=SERVING.example_candidates)
        found = answer_candidates(loaded.model, loaded.tokenizer, config, inputs, nearest,
                                  num_beams=SERVING.num_beams, example_candidates=SERVING.example_candidates,
                                  max_new_tokens=config.max_target_length, batch_size=MAX_BATCH_SIZE)
        return [GenerationResult(candidates=f.candidates, origins=f.origins, model_version=loaded.version)
                for f in found]

    def _value_index(self, db_id: str | None, schema: SchemaSnapshot, cfg) -> dict | None:
        """The database's own values for schema linking, built like tokenize builds them (cached per database)."""
        if not (cfg.schema_linking and cfg.linking_values) or db_id not in self._databases:
            return None
        from pipelines.common.schema_linking import value_index_for

        return value_index_for(self._databases[db_id], schema, cfg.linking_values)

    async def _generate(self, question: str, schema: SchemaSnapshot, db_id: str | None = None) -> GenerationResult:
        item = GenerationItem(question=question, schema_json=schema.model_dump_json(), db_id=db_id)
        # Through the service's own client, so the call joins the adaptive-batching queue.
        [result] = await self.to_async.generate_batch([item])
        return result if isinstance(result, GenerationResult) else GenerationResult.model_validate(result)

    def _choose(self, result: GenerationResult, target: str | None) -> tuple[str, str]:
        """(SQL, origin): the first candidate that executes when a database is known (else the first), then the
        SELECT-only check."""
        chosen = first_executable(result.candidates, target, timeout_s=SERVING.sql_timeout_s) if target else None
        chosen = chosen if chosen is not None else 0
        sql = result.candidates[chosen]
        try:
            check_single_select(sql)
        except SQLError as exc:
            raise UnprocessableEntity(f"the model produced a statement that is not a single SELECT: {exc}") from exc
        return sql, result.origins[chosen]

    @bentoml.api(route="/sql", input_spec=SqlRequest)
    async def sql(self, question: str, db_id: str | None = None, schema_: SchemaSnapshot | None = None) -> SqlResponse:
        """Translate a question into SQL for a known database (db_id) or an inline schema."""
        started = time.perf_counter()
        target = self._target(db_id) if db_id is not None else None
        schema = self._schema(db_id) if db_id is not None else schema_
        result = await self._generate(question, schema, db_id)
        sql, origin = await self._in_thread(self._choose, result, target)
        return SqlResponse(sql=sql, model_version=result.model_version, execution_guided=target is not None,
                           origin=origin,
                           latency_ms=round((time.perf_counter() - started) * 1000, 2))

    @bentoml.api(route="/query", input_spec=QueryRequest)
    async def query(self, question: str, db_id: str) -> QueryResponse:
        """Translate a question into SQL and run it read-only (time and row limits) on the database."""
        from pipelines.common.sql import execute_readonly

        started = time.perf_counter()
        target = self._target(db_id)
        result = await self._generate(question, self._schema(db_id), db_id)
        sql, origin = await self._in_thread(self._choose, result, target)
        try:
            rows = await self._in_thread(
                execute_readonly, target, sql, timeout_s=SERVING.sql_timeout_s, max_rows=SERVING.max_rows
            )
        except SQLTimeoutError as exc:
            raise UnprocessableEntity(f"the query ran past the time limit: {exc}") from exc
        except SQLExecutionError as exc:
            raise UnprocessableEntity(f"the database rejected the generated query: {exc}") from exc
        except SQLError as exc:
            raise UnprocessableEntity(f"the generated query cannot be run: {exc}") from exc
        return QueryResponse(
            sql=sql, model_version=result.model_version, execution_guided=True, origin=origin,
            columns=rows.columns, rows=[[_json_value(v) for v in row] for row in rows.rows],
            truncated=rows.truncated, row_count=len(rows.rows),
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    @bentoml.api(route="/reload")
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Admin: check the model alias now and swap to its current version if it moved."""
        if ADMIN_TOKEN and not hmac.compare_digest(ctx.request.headers.get("x-admin-token", ""), ADMIN_TOKEN):
            raise Forbidden("missing or wrong X-Admin-Token header")
        try:
            previous, changed = await self._in_thread(self._reload)
        except PipelineError as exc:
            raise ServiceUnavailable(f"cannot resolve {MODEL_URI}: {exc}") from exc
        return ReloadResponse(model_version=self._model.version, previous_version=previous, changed=changed)

    @staticmethod
    async def _in_thread(func, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(func, *args, **kwargs))
