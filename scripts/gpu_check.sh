#!/usr/bin/env bash
# On an NVIDIA machine: a 2-slot sweep on one GPU, printing the device name, trials per minute,
# peak GPU memory (nvidia-smi, both slot processes and their CUDA contexts) and whether the
# trials trained in bf16. Needs the project's virtualenv with a CUDA build of torch:
#     make setup TORCH_SPEC='torch>=2.2,<3' && scripts/gpu_check.sh [N_TRIALS]
# Runs on a scratch SQLite database in a temporary directory; nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
N_TRIALS=${1:-16}
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: not an NVIDIA machine" >&2; exit 2; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: this torch has no CUDA (install a CUDA build: see the comment above)" >&2; exit 2; }

work=$(mktemp -d)
trap 'kill "$smi" 2>/dev/null || true; rm -rf "$work"' EXIT
export CONVERGE_DATABASE_URL="sqlite:///$work/gpu.db" CONVERGE_WORKER_POLL_S=0.1 PYTHONUNBUFFERED=1
cat >"$work/spec.yaml" <<SPEC
name: gpu-check
task: {model: cnn, dataset: "sklearn:digits", params: {channels: 64}}
search_space: {epochs: {value: 20}, batch_size: {choices: [64, 256]}, lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
n_trials: $N_TRIALS
sampler: {name: random, seed: 0}
pruner: {name: none}
SPEC
"$PYTHON" -m converge.service.cli db upgrade >/dev/null
"$PYTHON" -m converge.service.cli study create --spec "$work/spec.yaml" >/dev/null

echo "device:    $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i 0)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$work/memory.log" &
smi=$!
"$PYTHON" -m converge.service.cli worker --devices cuda:0 --slots-per-device 2 --exit-when-idle >"$work/worker.log" 2>&1 \
    || { cat "$work/worker.log"; exit 1; }
kill "$smi"

"$PYTHON" - "$work" <<'PY'
import sys
from pathlib import Path

import optuna

from core.settings import get_settings
from studies.storage import storage_for

work = Path(sys.argv[1])
trials = optuna.load_study(study_name="gpu-check", storage=storage_for(get_settings())).get_trials()
done = [t for t in trials if t.state.name == "COMPLETE"]
span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
memory = [int(x) for x in (work / "memory.log").read_text().split() if x.strip().isdigit()]
log = (work / "worker.log").read_text()
print(f"trials:    {len(done)} of {len(trials)} complete, 2 slots on cuda:0")
print(f"speed:     {len(done) / span * 60:.1f} trials/min (first trial's start to last trial's end)")
print(f"memory:    peak {max(memory)} MiB used on the GPU during the sweep")
print(f"bf16:      {'yes' if 'precision bf16-mixed' in log else 'no'} "
      f"({log.count('precision bf16-mixed')} trial(s) logged bf16-mixed)")
PY
