#!/bin/sh
# One-shot schema setup for Temporal's PostgreSQL stores, run by the `temporal-admin-tools` service of
# docker-compose.temporal.yml before the server starts (the server image no longer sets up its own schema).
# Safe to run again: `create` fails on an existing database, which we ignore, and update-schema is idempotent.
set -eu
: "${POSTGRES_SEEDS:?set POSTGRES_SEEDS to the PostgreSQL host}"
: "${POSTGRES_USER:?set POSTGRES_USER}"
PORT="${DB_PORT:-5432}"

nc -z -w 10 "$POSTGRES_SEEDS" "$PORT"
for db in temporal temporal_visibility; do
  case "$db" in temporal) dir=temporal ;; *) dir=visibility ;; esac
  temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -u "$POSTGRES_USER" -p "$PORT" --db "$db" create || true
  temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -u "$POSTGRES_USER" -p "$PORT" --db "$db" setup-schema -v 0.0 || true
  temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -u "$POSTGRES_USER" -p "$PORT" --db "$db" \
    update-schema -d "/etc/temporal/schema/postgresql/v12/$dir/versioned"
done
echo "PostgreSQL schema ready"
