"""Where each artifact lives, relative to the workspace (the repository root when run by DVC).
dvc.yaml names the same paths; tests run the stages in a temporary workspace by changing directory."""

from pathlib import Path

INGESTED = Path("data/ingested")
INGESTED_EXAMPLES = INGESTED / "examples.parquet"
INGESTED_SCHEMAS = INGESTED / "schemas"
INGESTED_DATABASES = INGESTED / "databases"
DATABASES_INDEX = INGESTED / "databases.json"
INGEST_MANIFEST = INGESTED / "manifest.json"

VALIDATED = Path("data/validated")
VALIDATED_EXAMPLES = VALIDATED / "examples.parquet"
QUARANTINE = VALIDATED / "quarantine.parquet"
VALIDATION_REPORT = Path("reports/validation")

TOKENIZER = Path("models/tokenizer")
TOKENIZED = Path("data/tokenized")

TEACHER = Path("models/teacher")
STUDENT = Path("models/student")
ONNX = Path("models/onnx")
ONNX_FP32 = ONNX / "fp32"
ONNX_INT8 = ONNX / "int8"
CHECKPOINTS = Path("checkpoints")

METRICS = Path("metrics")
PLOTS = Path("plots")
PREDICTIONS = Path("reports/predictions.jsonl")

SERIALIZATION_FILE = "serialization.json"
