#!/usr/bin/env bash
# One prepared check for a machine with an accelerator, within a time budget (default 8 minutes wall):
#
#   bench/device_check.sh                          # GPU: set up, tiny-model parity vs the CPU, the rows, the doc
#   bench/device_check.sh --device cpu --quick     # the same steps on the CPU on the tiny model (a dry run)
#   bench/device_check.sh --rows sd15_512_b1 --budget 300 --out DIR
#
# Steps, each timed, each under what is left of the budget (a step past it is killed, the next ones skipped):
#   1. setup: Python packages. Offline machines: wheels in .whl/ (diffusers, ...) are installed into a private
#      target folder, never into the system; .whl/fallback/ holds a flax to use if the installed one cannot run
#      sdjax. With network: pip install -e ".[cuda,test]" when sdjax's imports fail.
#   2. env: the accelerator and the versions.
#   3. parity: the shipped tiny model's images on the accelerator vs the CPU (bench/accelerator.py --parity).
#   4. rows: bench/accelerator.py: sdjax vs diffusers PyTorch, txt2img + UNet step + compile + peak memory.
# Results: bench/results.json ("accelerator") and docs/benchmarks.md (`--results`/`--doc` move them), copied with
# the log to --out (default $OUT when set). Exit status: 0 when every step passed.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
device=gpu quick="" budget=480 rows="" out="${OUT:-}" results="" doc=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick="--quick"; shift ;;
    --budget) budget="$2"; shift 2 ;;
    --rows) rows="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    --doc) doc="$2"; shift 2 ;;
    *) echo "device_check.sh: unknown option $1 (see the head of bench/device_check.sh)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
[ "$device" = cpu ] && export JAX_PLATFORMS=cpu
log="$(mktemp -d)/device_check.log"
status=0
summary=()

left() { echo $(( budget - ($(date +%s) - start) )); }

step() {  # step NAME COMMAND...: run under what is left of the budget, record rc and seconds
  local name="$1"; shift
  local remaining; remaining=$(left)
  if [ "$remaining" -le 10 ]; then
    summary+=("$name: skipped (budget spent)"); status=1; return 1
  fi
  local t0; t0=$(date +%s%N)
  echo "== $name (budget left ${remaining}s)" | tee -a "$log"
  timeout --kill-after=10 "$remaining" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  summary+=("$name: rc=$rc $(( ms / 1000 )).$(( ms % 1000 / 100 ))s")
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

imports_ok() {
  "$python" - <<'EOF'
import jax, jax.numpy as jnp
from flax import nnx
import sdjax
from sdjax.models import UNet2DConditionModel  # noqa: F401 (flax API the ports use)
m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
print("sdjax imports ok:", jax.__version__, jax.devices()[0].platform, float(jnp.sum(m(jnp.ones((1, 2))))) == float(jnp.sum(m(jnp.ones((1, 2))))))
EOF
}

setup() {
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sdjax-site \
      .whl/*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/sdjax-site"
  fi
  imports_ok && return 0
  if ls .whl/fallback/*.whl >/dev/null 2>&1; then
    echo "the installed packages cannot run sdjax: trying .whl/fallback/"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/sdjax-fallback .whl/fallback/*.whl || return 1
    export PYTHONPATH="/tmp/sdjax-fallback:$PYTHONPATH"
    imports_ok && return 0
  fi
  echo "installing sdjax with its accelerator and test extras"
  extra=test; [ "$device" = gpu ] && extra="cuda,test"
  "$python" -m pip install -q -e ".[$extra]" && imports_ok
}

envinfo() {
  [ "$device" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  "$python" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001 (a report, not a check)
        print(name, "missing:", type(e).__name__)
import jax
print("jax devices:", jax.devices())
EOF
}

# `setup` runs in this shell (it exports PYTHONPATH: no pipe), timed by hand; the other steps through `step`.
t0=$(date +%s)
echo "== setup" | tee -a "$log"
setup > >(tee -a "$log") 2>&1
rc=$?
summary+=("setup: rc=$rc $(( $(date +%s) - t0 ))s")
if [ "$rc" -ne 0 ]; then status=1; fi

export python device
export -f envinfo
step env bash -c envinfo
args=(--device "$device" $quick)
[ -n "$results" ] && args+=(--results "$results")
[ -n "$doc" ] && args+=(--doc "$doc")
if [ "$rc" -eq 0 ]; then
  step parity "$python" bench/accelerator.py "${args[@]}" --rows "" --parity --budget "$(left)"
  step rows "$python" bench/accelerator.py "${args[@]}" ${rows:+--rows "$rows"} --budget "$(( $(left) - 15 ))"
fi

echo "== summary (total $(( $(date +%s) - start ))s of ${budget}s)" | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
if [ -n "$out" ]; then
  mkdir -p "$out"
  cp "$log" "$out/" 2>/dev/null
  cp "${results:-bench/results.json}" "$out/results.json" 2>/dev/null
  cp "${doc:-docs/benchmarks.md}" "$out/benchmarks.md" 2>/dev/null
fi
exit "$status"
