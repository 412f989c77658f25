#!/usr/bin/env bash
# One GPU session for issue 15 (GPU throughput): run from the repository root on the lent GPU machine.
#
#   OUT=/some/dir bash bench/gpu_session.sh             # CUDA, full sizes; must finish in < 8 minutes on an H200
#   OUT=/tmp/gpuout bash bench/gpu_session.sh --cpu-smoke  # the same sequence on CPU in quick mode (< 3 minutes)
#
# Writes at most 8 flat files into "$OUT": session.log (environment + every command's output), throughput.json
# (stage vs kernel-only rates: the issue's four targets), crop_embedding.json, pseudo_labels.json, training.json
# (the project's benches, `python -m bench.run_all --only ...` equivalents, one process each so each has its own
# time limit; the --cpu-smoke runs them in one process), results.md (tables by bench.report + what was skipped, why).
# kmeans (needs ray), end_to_end (needs mlflow), storage (needs ../shared/data) and cost_model (reads a full
# results set) are not run here; results.md records why. Every step has a time limit; a step that fails or runs out
# of time is recorded and the script goes on, so whatever was measured comes back.
set -u
MODE=cuda
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=cpu; fi
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
PY=${PYTHON:-python3}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# Wheels the GPU machine lacks (pydantic & co., faiss-cpu), carried by the lead in .whl/.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || log "wheel install FAILED"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$MODE" = cpu ]; then
  # Mimic the GPU machine: ray and mlflow are not importable there.
  BLOCK=$(mktemp -d)
  printf 'import sys\nfor _m in ("ray", "mlflow"):\n    sys.modules[_m] = None\n' > "$BLOCK/sitecustomize.py"
  export PYTHONPATH=$BLOCK:$PYTHONPATH
  DEV=(--device cpu --quick)
  LIM_TP=150; LIM_B=60
else
  DEV=(--device cuda)
  LIM_TP=330; LIM_B=50
fi
# Hard budget for the whole script (the GPU lease allows < 8 minutes): no step may run past it.
BUDGET=${GPU_SESSION_BUDGET_S:-465}
export TRANSFGU_COMPILE=auto
export TORCH_LOGS=recompiles  # every torch.compile recompilation (and its reason) goes to session.log

log "mode $MODE, python $($PY -c 'import sys; print(sys.version.split()[0])'), cwd $PWD"
{
  $PY - <<'PY'
import importlib.metadata as md, importlib.util, json
out = {}
for dist, mod in (("torch", "torch"), ("timm", "timm"), ("numpy", "numpy"), ("pyarrow", "pyarrow"),
                  ("pydantic", "pydantic"), ("faiss-cpu", "faiss"), ("ray", "ray"), ("mlflow", "mlflow"),
                  ("pillow", "PIL"), ("torchvision", "torchvision")):
    try:
        found = importlib.util.find_spec(mod) is not None  # None also when blocked (the CPU smoke's stand-in)
    except (ImportError, ValueError):
        found = False
    try:
        ver = md.version(dist)
    except md.PackageNotFoundError:
        ver = None
    out[dist] = ver if found else f"not importable (installed: {ver})"
print(json.dumps(out, indent=1))
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
} >>"$LOG" 2>&1

run() {  # run <limit seconds> <name> <command...>
  local lim=$1 name=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt "$lim" ]; then lim=$left; fi
  if [ "$lim" -lt 15 ]; then log "SKIP $name: only ${left}s of the ${BUDGET}s budget left"; echo "$name skipped" >> "$OUT/.status"; return; fi
  log "START $name (limit ${lim}s): $*"
  timeout --kill-after=10 "$lim" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then log "DONE $name"; else log "FAILED $name rc=$rc$([ $rc -eq 124 ] && echo ' (time limit)')"; fi
  echo "$name $rc" >> "$OUT/.status"
}

: > "$OUT/.status"
# 1. The issue's targets: every stage against its kernel-only rate, in one process.
run "$LIM_TP" throughput $PY -m bench.throughput "${DEV[@]}" --out "$OUT/throughput.json"
# 2. The project's benches that need neither ray nor mlflow nor ../shared/data (bench.run_all --only ..., one
#    process per bench as run_all does, each with its own limit).
if [ "$MODE" = cuda ]; then
  for b in crop_embedding pseudo_labels training; do
    run "$LIM_B" "$b" $PY -m "bench.$b" "${DEV[@]}" --out "$OUT/$b.json"
  done
else
  # The smoke runs the same three bench mains in one process (one torch import instead of three: the 2-core VM
  # it is meant for is often loaded).
  run 120 "crop_embedding+pseudo_labels+training" $PY -c "
import sys
from bench import crop_embedding, pseudo_labels, training
for m in (crop_embedding, pseudo_labels, training):
    m.main(['--device', 'cpu', '--quick', '--out', sys.argv[1] + '/' + m.__name__.split('.')[-1] + '.json'])
" "$OUT"
fi

# 3. results.md: the tables (bench.report) and what was not run, with the reason.
{
  echo "# GPU session results ($MODE)"
  echo
  echo "Produced by \`OUT=... bash bench/gpu_session.sh${1:+ $1}\` in $(( $(date +%s) - T0 )) s."
  echo
  echo "| step | exit status |"; echo "|---|---|"
  while read -r n rc; do echo "| $n | $rc$([ "$rc" = 124 ] && echo ' (time limit: partial results kept)') |"; done < "$OUT/.status"
  echo
  echo "Not run here: kmeans (needs ray), end_to_end (needs ray/mlflow through the pipeline's tracking),"
  echo "storage (needs ../shared/data, not on this machine), cost_model (needs a complete results set)."
  echo
  $PY -m bench.report "$OUT" 2>&1 || echo "(bench.report failed)"
} > "$OUT/results.md"
rm -f "$OUT/.status"
[ "$MODE" = cpu ] && rm -rf "$BLOCK"
log "finished in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
