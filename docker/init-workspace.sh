#!/bin/bash
# Prepare the shared DVC workspace volume (NL2SQL_WORKSPACE) from the code baked into the image:
# refresh pipelines/, dvc.yaml and params.yaml on every start (so a new image brings new code), keep
# data/, models/, dvc.lock and the DVC cache, and point DVC's default remote at the MinIO bucket.
set -euo pipefail
workspace="${NL2SQL_WORKSPACE:?NL2SQL_WORKSPACE must be set}"
mkdir -p "${workspace}"
cd "${workspace}"
rm -rf pipelines
cp -r /opt/nl2sql/pipelines /opt/nl2sql/dvc.yaml .
# params.yaml is copied only once: after that it is the operator's to edit in the volume.
[ -f params.yaml ] || cp /opt/nl2sql/params.yaml .
[ -d .git ] || git init -q
[ -d .dvc ] || { python -m dvc init -q && python -m dvc config core.analytics false; }
python -m dvc remote add --force --default minio "s3://${DVC_BUCKET:?}/nl2sql"
python -m dvc remote modify minio endpointurl "${DVC_S3_ENDPOINT_URL:?}"
mkdir -p "${NL2SQL_DATA_DIR:-${workspace}/data/incoming}"
echo "workspace ${workspace} ready (remote s3://${DVC_BUCKET}/nl2sql at ${DVC_S3_ENDPOINT_URL})"
