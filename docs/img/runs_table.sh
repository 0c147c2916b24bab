#!/usr/bin/env bash
# The README's screenshot of MLflow's runs table (docs/img/runs_table.png): the UI on this repo's mlflow.db, opened
# on the runs table of the track.experiment, captured by headless Chromium (Debian's chromium package).
# Run from the repo root after `make track` (or `dvc repro`):  bash docs/img/runs_table.sh
set -euo pipefail
PORT=${PORT:-5077}
DB="sqlite:///$(pwd)/mlflow.db"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
setsid mlflow ui --backend-store-uri "$DB" --host 127.0.0.1 --port "$PORT" > /tmp/dfq-mlflow-ui.log 2>&1 &
PGID=$!
trap 'kill -- -$PGID 2>/dev/null || true' EXIT
for _ in $(seq 90); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
URL=$(python -c "from dfq.pipeline.tracking import runs_page_url; import yaml; \
e = yaml.safe_load(open('params.yaml'))['track']['experiment']; print(runs_page_url('$DB', e, 'http://127.0.0.1:$PORT'))")
PROFILE=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$PROFILE" --hide-scrollbars \
  --window-size=1600,900 --virtual-time-budget=30000 --screenshot=docs/img/runs_table.png "$URL"
rm -rf "$PROFILE"
echo "docs/img/runs_table.png <- $URL"
