#!/usr/bin/env bash
# Bulk txt2img on one machine with several GPUs: install sdjax with CUDA jax, then one `sdjax txt2img` process that
# splits every batch over all the local GPUs (sdjax's `data` mesh axis).
#
#   launch/multi_gpu.sh --prompts prompts.txt --outdir out [--gpus 0,1,2,3] [--no-install] [--dry-run] \
#       -- --n_samples 8 --n_iter 1 --ddim_steps 30 --ckpt runwayml/stable-diffusion-v1-5
#
# Everything after `--` goes to `sdjax txt2img` unchanged. An --n_samples (times --prompts-per-batch) that is a
# multiple of the GPU count keeps every GPU busy (a batch is padded up to one).
# One host needs one process (no jax.distributed: it sees every local GPU). Several GPU hosts: run this script on
# each with the same flags plus `-- --coordinator HOST0:PORT --num-processes N --process-id I` (I = 0 on HOST0) and
# an --outdir all hosts share; see the README's "Multi-host" section.
# Settings also read environment variables (flags win):
#   SDJAX_PROMPTS SDJAX_OUTDIR SDJAX_PIP SDJAX_SOURCE SDJAX_GPUS PYTHON JAX_CUDA (default cuda12).
# --dry-run prints every command instead of running it.
set -euo pipefail

PROMPTS=${SDJAX_PROMPTS:-}
OUTDIR=${SDJAX_OUTDIR:-outputs/txt2img-samples}
PIP_SPEC=${SDJAX_PIP:-sdjax}       # what `pip install` gets: sdjax, a version, or 'sdjax @ git+https://...'
SOURCE=${SDJAX_SOURCE:-}           # or a local sdjax checkout to install from
GPUS=${SDJAX_GPUS:-}               # e.g. 0,1: only these GPUs (CUDA_VISIBLE_DEVICES); default all
PYTHON=${PYTHON:-python3}
JAX_CUDA=${JAX_CUDA:-cuda12}
INSTALL=1 DRY_RUN=0
SDJAX_ARGS=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "multi_gpu.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --prompts) PROMPTS=$2; shift 2 ;;
    --outdir) OUTDIR=$2; shift 2 ;;
    --pip) PIP_SPEC=$2; shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; SDJAX_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $PROMPTS ]] || die "--prompts (or SDJAX_PROMPTS) is required: a text file, one prompt per line"
[[ $DRY_RUN == 1 || -f $PROMPTS ]] || die "--prompts $PROMPTS: no such file"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma-separated list of GPU indices, got '$GPUS'"
for a in "${SDJAX_ARGS[@]}"; do
  case $a in --from-file|--outdir) die "$a is set by this script (use --prompts / --outdir)" ;; esac
done

run() {  # run a command, or print it shell-quoted (copy-pasteable) in a dry run
  if [[ $DRY_RUN == 1 ]]; then
    local out=() a
    for a in "$@"; do if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi; done
    echo "${out[*]}"
  else
    "$@"
  fi
}

if [[ $INSTALL == 1 ]]; then
  run "$PYTHON" -m pip install -U "jax[$JAX_CUDA]" "${SOURCE:-$PIP_SPEC}"
fi
ENV=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)  # the reranker and the pipeline share each GPU's memory
[[ -n $GPUS ]] && ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
run "${ENV[@]}" "$PYTHON" -c 'import jax; print(f"sdjax: {jax.device_count()} devices: {jax.devices()}")'
if [[ $DRY_RUN == 1 && " ${SDJAX_ARGS[*]} " != *" --num-processes "* ]]; then
  echo "# one process drives every GPU of this host: no --coordinator / --num-processes needed"
fi
run "${ENV[@]}" "$PYTHON" -m sdjax.cli txt2img --from-file "$PROMPTS" --outdir "$OUTDIR" "${SDJAX_ARGS[@]}"
