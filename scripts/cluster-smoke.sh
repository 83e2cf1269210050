#!/usr/bin/env bash
# The docker-compose topology as local processes: a scratch PostgreSQL database, `converge db upgrade`,
# the API (`converge serve --workers 0`), two `converge worker` processes, and a tiny study through the
# REST API to `done`. Exits 0 and prints "cluster smoke: ok" when it all worked; cleans up either way.
#   scripts/cluster-smoke.sh            (PostgreSQL at CONVERGE_TEST_POSTGRES_URL, default postgres@127.0.0.1:5432)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ADMIN_URL=${CONVERGE_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
PORT=${SMOKE_PORT:-$((20000 + RANDOM % 20000))}
DB=converge_smoke_$$
LOG=$(mktemp -d)
PIDS=()

sql() { "$PY" -c "import sqlalchemy as sa, sys; e = sa.create_engine(sys.argv[1], isolation_level='AUTOCOMMIT')
with e.connect() as c: c.execute(sa.text(sys.argv[2]))" "$ADMIN_URL" "$1"; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  sql "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" || true
  rm -rf "$LOG"
}
trap cleanup EXIT
fail() { echo "cluster smoke: FAILED: $*" >&2; tail -n 20 "$LOG"/*.log >&2 || true; exit 1; }

sql "CREATE DATABASE \"$DB\""
export CONVERGE_DATABASE_URL
CONVERGE_DATABASE_URL=$("$PY" -c "import sqlalchemy as sa, sys
print(sa.make_url(sys.argv[1]).set(database=sys.argv[2]).render_as_string(hide_password=False))" "$ADMIN_URL" "$DB")
export CONVERGE_HEARTBEAT_INTERVAL_S=2 CONVERGE_WORKER_POLL_S=0.3 CONVERGE_DASHBOARD_FIGURES_EVERY_S=0
CONVERGE=("$PY" -m converge.service.cli)

"${CONVERGE[@]}" db upgrade                                                   # the `migrate` service
"${CONVERGE[@]}" serve --host 127.0.0.1 --port "$PORT" --workers 0 >"$LOG/api.log" 2>&1 &   # `api`
PIDS+=($!)
for i in 1 2; do                                                              # `worker`, two replicas
  "${CONVERGE[@]}" worker --devices cpu --slots-per-device 1 >"$LOG/worker$i.log" 2>&1 &
  PIDS+=($!)
done

API=http://127.0.0.1:$PORT
for _ in $(seq 100); do curl -fsS "$API/v1/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$API/v1/health" >/dev/null || fail "the API did not come up"
curl -fsS -X POST "$API/v1/studies" -H 'Content-Type: application/json' -d '{
  "name": "smoke", "n_trials": 4, "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
  "task": {"model": "mlp", "dataset": "sklearn:iris", "params": {"width": 8, "depth": 1}},
  "search_space": {"lr": {"low": 0.001, "high": 0.1, "log": true}, "batch_size": 32, "epochs": 2,
                   "weight_decay": 0.0001, "dropout": 0.0}}' >/dev/null || fail "POST /v1/studies"

state=""
for _ in $(seq 240); do
  state=$(curl -fsS "$API/v1/studies/smoke" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['state'])")
  [ "$state" = done ] || [ "$state" = failed ] && break
  sleep 0.5
done
[ "$state" = done ] || fail "study state $state, not done"
workers=$(curl -fsS "$API/v1/workers" | "$PY" -c "import json, sys; print(sum(w['alive'] for w in json.load(sys.stdin)))")
[ "$workers" = 2 ] || fail "$workers workers alive, not 2"
curl -fsS "$API/metrics" | grep -q '^converge_trials{state="complete"} 4$' || fail "/metrics does not count 4 trials"
curl -fsS "$API/v1/studies/smoke/plot" | "$PY" -c "import json, sys
assert sum(json.load(sys.stdin)['verdict_counts'].values()) == 4" || fail "the study plot"
echo "cluster smoke: ok (study done, 4 trials, 2 workers, API on :$PORT, database $DB)"
