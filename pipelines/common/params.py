"""Typed view of params.yaml. Every stage and the service read their knobs from here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.common.errors import PipelineError, describe_validation_error

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoParams(Section):
    n_pairs: int = Field(2400, ge=1)
    n_customers: int = Field(600, ge=10)


class CustomParams(Section):
    examples: str | None = None
    database: str | None = None
    db_id: str = "custom"


class IngestParams(Section):
    source: Literal["demo", "spiderman", "spider", "custom"] = "demo"
    path: str | None = None
    split_mode: Literal["by_question", "by_database"] = "by_question"
    dev_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    sample_values: int = Field(3, ge=0)
    max_examples: int | None = Field(None, ge=1)
    # Schema-driven synthetic pairs (common/synthetic.py) per human train pair, train split only; 0 = off.
    synthetic_ratio: float = Field(0.0, ge=0)
    demo: DemoParams = DemoParams()
    custom: CustomParams = CustomParams()


class ValidateParams(Section):
    on_failure: Literal["fail", "quarantine"] = "fail"
    question_min_chars: int = Field(3, ge=1)
    question_max_chars: int = Field(500, ge=1)
    sql_timeout_s: float = Field(5.0, gt=0)


class ModelParams(Section):
    base: str = "scratch"


class SerializationParams(Section):
    include_types: bool = True
    include_keys: bool = True
    sample_values: int = Field(0, ge=0)
    lowercase: bool = True
    # Schema linking (issue 7, pipelines/common/schema_linking.py): matched items first and marked with `*`,
    # matched cell values attached to their column, the rest pruned. Off keeps the text byte-identical.
    schema_linking: bool = False
    linking_values: int = Field(200, ge=0)  # most frequent values per text column indexed from the database
    linking_max_values: int = Field(3, ge=1)  # matched values written per column
    linking_max_tables: int | None = Field(None, ge=1)  # keep at most this many tables (best first); null = all
    linking_max_columns: int | None = Field(None, ge=0)  # per table, unmatched non-key columns beyond this go
    # Retrieval (pipelines/common/retrieval.py): the k nearest training examples of the same database, with
    # their SQL, written into the input; 0 = off. `retrieval_dropout` of the training inputs go without, so
    # the model also learns to answer for a database it has no examples of.
    retrieval_k: int = Field(0, ge=0)
    retrieval_encoder: Literal["tfidf", "minilm"] = "minilm"  # question similarity (pipelines/common/retrieval.py)
    retrieval_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # Similarity bonus x the share of an example's SQL literals the question mentions (retrieval.literal_agreement).
    retrieval_literal_weight: float = Field(0.0, ge=0.0)
    # A database with no training examples (first met at inference) gets this many question/SQL pairs generated
    # from its own schema and rows as its retrieval examples (pipelines/common/synthetic.py); 0 = none.
    unseen_db_examples: int = Field(0, ge=0)
    # SQL punctuation as tokens of its own: the scratch tokenizer isolates . , ( ) : ; | * = < > ! and quotes,
    # and SQL targets are spaced (`t1 . name`, `count ( * )`), so an identifier is the same tokens in the
    # schema, the similar examples and the output. Predictions are tidied back (`t1.name`).
    split_punctuation: bool = False


class TokenizeParams(Section):
    vocab_size: int = Field(4000, ge=100)
    max_source_length: int = Field(384, ge=16)
    max_target_length: int = Field(160, ge=8)
    serialization: SerializationParams = SerializationParams()


class T5Params(Section):
    d_model: int = Field(256, ge=1)
    d_ff: int = Field(1024, ge=1)
    d_kv: int = Field(32, ge=1)
    num_heads: int = Field(8, ge=1)
    num_layers: int = Field(3, ge=1)
    num_decoder_layers: int = Field(3, ge=1)
    dropout_rate: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _decoder_fits_the_cache(self) -> T5Params:
        # transformers 4.57's generate sizes T5's key/value cache by num_layers and fails with an
        # IndexError after training when the decoder has more layers; say so before any work.
        if self.num_decoder_layers > self.num_layers:
            raise ValueError(f"num_decoder_layers ({self.num_decoder_layers}) > num_layers ({self.num_layers}): "
                             "transformers' generate cannot decode such a T5 (its cache has num_layers entries)")
        return self


class TrainParams(Section):
    t5: T5Params = T5Params()
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    # adafactor: T5's own optimizer (scales updates by parameter size); adamw_torch_fused (the Trainer's
    # default) and adamw_torch: AdamW
    optimizer: Literal["adamw_torch_fused", "adamw_torch", "adafactor"] = "adamw_torch_fused"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    epochs: float = Field(8, gt=0)
    max_train_minutes: float | None = Field(6.0, gt=0)
    eval_steps: int = Field(200, ge=1)
    early_stopping_patience: int = Field(3, ge=1)
    save_total_limit: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto"] | bool = "auto"


class DistillParams(Section):
    student: T5Params = T5Params(d_model=128, d_ff=512, num_heads=4, num_layers=2, num_decoder_layers=2)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    epochs: float = Field(8, gt=0)
    max_train_minutes: float | None = Field(3.0, gt=0)
    sequence_level: bool = False
    sequence_level_beams: int = Field(4, ge=1)


class ExportParams(Section):
    source: Literal["student", "teacher"] = "student"
    quantize: bool = True
    parity_examples: int = Field(64, ge=1)
    int8_max_ex_drop: float = Field(0.01, ge=0, le=1)


class EvaluateParams(Section):
    model: Literal["onnx-int8", "onnx-fp32", "student", "teacher"] = "onnx-int8"
    split: Literal["train", "dev", "test"] = "test"
    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(160, ge=1)
    sql_timeout_s: float = Field(5.0, gt=0)
    max_rows: int = Field(10000, ge=1)
    max_examples: int | None = Field(None, ge=1)
    # Constrained decoding (common/constrained.py): only SQL words, this schema's names and the question's words.
    constrained: bool = False
    # The SQL of the K bank examples nearest to the question is tried before the model's beams
    # (common/candidates.py); 0 = beams only.
    example_candidates: int = Field(0, ge=0)


class PromoteParams(Section):
    model_name: str = "nl2sql"
    metric: str = "ex_execution_guided"
    margin: float = Field(0.0, ge=0)


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "nl2sql"


class ServingParams(Section):
    model: str = "models:/nl2sql@champion"
    max_question_chars: int = Field(500, ge=1)
    max_rows: int = Field(1000, ge=1)
    sql_timeout_s: float = Field(5.0, gt=0)
    num_beams: int = Field(4, ge=1)
    example_candidates: int = Field(0, ge=0)  # as evaluate.example_candidates
    reload_interval_s: float = Field(30, gt=0)


class Params(Section):
    seed: int = 42
    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    model: ModelParams = ModelParams()
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    distill: DistillParams = DistillParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()
    serving: ServingParams = ServingParams()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and type-check params.yaml; every problem is reported with its key path."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {describe_validation_error(exc)}") from exc
