# MLflow tracking server + model registry: PostgreSQL backend store, artifacts proxied to MinIO (S3).
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*
# The same MLflow as requirements/lock.txt, plus the PostgreSQL driver and the S3 client.
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3"
USER nobody
EXPOSE 5000
