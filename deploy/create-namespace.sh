#!/bin/sh
# Creates the namespace workers and the CLI use (default: "default") once the server answers, run by the
# `temporal-create-namespace` service of docker-compose.temporal.yml. Exits 0 if it already exists.
set -eu
NAMESPACE="${DEFAULT_NAMESPACE:-default}"
ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
attempt=1
until temporal operator cluster health --address "$ADDRESS" >/dev/null 2>&1; do
  [ "$attempt" -ge 60 ] && { echo "Temporal at $ADDRESS did not become healthy"; exit 1; }
  attempt=$((attempt + 1)); sleep 2
done
if temporal operator namespace describe -n "$NAMESPACE" --address "$ADDRESS" >/dev/null 2>&1; then
  echo "namespace $NAMESPACE exists"
else
  temporal operator namespace create -n "$NAMESPACE" --retention 7d --address "$ADDRESS"
  echo "namespace $NAMESPACE created"
fi
