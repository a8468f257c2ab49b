#!/bin/bash
# Run once by the postgres image on an empty data volume: one database per consumer.
set -euo pipefail
for database in ${POSTGRES_EXTRA_DATABASES}; do
  echo "creating database ${database}"
  psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname postgres \
    -c "CREATE DATABASE \"${database}\" OWNER \"${POSTGRES_USER}\";"
done
