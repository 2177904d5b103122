#!/usr/bin/env bash
# Bulk txt2img on a Cloud TPU VM or pod slice: create it, install sdjax on every worker, copy a prompt file,
# run `sdjax txt2img --from-file` on every worker (one multi-host run), copy the outputs back, optionally delete.
#
#   launch/tpu_vm.sh --name sd-v4 --zone us-central2-b --type v4-8 --prompts prompts.txt --outdir out \
#       [--shared-outdir /mnt/shared/run] [--dry-run] -- --n_samples 4 --n_iter 1 --ddim_steps 30 \
#       --ckpt runwayml/stable-diffusion-v1-5
#
# Everything after `--` goes to `sdjax txt2img` unchanged. Every setting also reads an environment variable
# (flags win): TPU_NAME TPU_ZONE TPU_TYPE TPU_VERSION GCP_PROJECT SDJAX_PROMPTS SDJAX_OUTDIR SDJAX_PIP SDJAX_SOURCE
# TPU_WORKERS SDJAX_SHARED_OUTDIR. --dry-run prints every command (copy-pasteable) instead of running it; it needs
# no gcloud.
#
# A pod slice runs the same program on every host, as TPU runtimes require. sdjax starts jax.distributed itself
# (on a TPU VM it finds the slice's workers without flags: no --coordinator / --num-processes / --process-id), lays
# every batch out over all hosts' chips, and each host saves only its own chips' images with its own
# manifest.<process>.jsonl. Without --shared-outdir each worker writes to its own disk (sdjax-run/outputs/<hostname>),
# copied back to <outdir>/worker-<i>; process 0's manifest.jsonl then lists only worker 0's images. With
# --shared-outdir DIR (a folder every worker mounts: Filestore/NFS, a GCS FUSE bucket) all write to DIR, process 0
# merges every host's records into DIR/manifest.jsonl and makes the grid, and only worker 0's view is copied back.
set -euo pipefail

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
TYPE=${TPU_TYPE:-v4-8}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${GCP_PROJECT:-}
PROMPTS=${SDJAX_PROMPTS:-}
OUTDIR=${SDJAX_OUTDIR:-}
PIP_SPEC=${SDJAX_PIP:-sdjax}           # what `pip install` gets: sdjax, a version, or 'sdjax @ git+https://...'
SOURCE=${SDJAX_SOURCE:-}               # or a local sdjax checkout, copied to the workers and installed from there
WORKERS=${TPU_WORKERS:-}               # number of hosts; asked from gcloud when not given
SHARED=${SDJAX_SHARED_OUTDIR:-}        # a folder mounted on every worker: one merged output folder
CREATE=1 DELETE=0 SPOT=0 DRY_RUN=0
SDJAX_ARGS=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --type|--accelerator-type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --prompts) PROMPTS=$2; shift 2 ;;
    --outdir) OUTDIR=$2; shift 2 ;;
    --pip) PIP_SPEC=$2; shift 2 ;;
    --source) SOURCE=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --shared-outdir) SHARED=$2; shift 2 ;;
    --no-create) CREATE=0; shift ;;
    --delete) DELETE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; SDJAX_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ -n $PROMPTS ]] || die "--prompts (or SDJAX_PROMPTS) is required: a text file, one prompt per line"
[[ $DRY_RUN == 1 || -f $PROMPTS ]] || die "--prompts $PROMPTS: no such file"
[[ -z $SOURCE || $DRY_RUN == 1 || -d $SOURCE ]] || die "--source $SOURCE: no such folder"
OUTDIR=${OUTDIR:-outputs/tpu-$NAME}
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

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT")
REMOTE=sdjax-run  # under the login user's home on every worker

if [[ $CREATE == 1 ]]; then
  CREATE_ARGS=(--accelerator-type="$TYPE" --version="$VERSION")
  [[ $SPOT == 1 ]] && CREATE_ARGS+=(--spot)
  run "${GC[@]}" create "$NAME" "${WHERE[@]}" "${CREATE_ARGS[@]}"
fi

# install (jax for TPUs + sdjax) on every worker
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="mkdir -p $REMOTE/outputs"
if [[ -n $SOURCE ]]; then
  run "${GC[@]}" scp --recurse "$SOURCE" "$NAME:$REMOTE/src" "${WHERE[@]}" --worker=all
  INSTALL="python3 -m pip install -U \"jax[tpu]\" ./$REMOTE/src"
else
  INSTALL="python3 -m pip install -U \"jax[tpu]\" $(printf '%q' "$PIP_SPEC")"
fi
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$INSTALL"

# the prompts, then the same run on every worker
run "${GC[@]}" scp "$PROMPTS" "$NAME:$REMOTE/prompts.txt" "${WHERE[@]}" --worker=all
# no distributed flags: on a TPU VM sdjax's jax.distributed.initialize() auto-detects the slice
if [[ -n $SHARED ]]; then
  SDJAX_CMD="python3 -m sdjax.cli txt2img --from-file $REMOTE/prompts.txt --outdir $(printf '%q' "$SHARED")"
else
  SDJAX_CMD="python3 -m sdjax.cli txt2img --from-file $REMOTE/prompts.txt --outdir $REMOTE/outputs/\$(hostname)"
fi
for a in "${SDJAX_ARGS[@]}"; do SDJAX_CMD+=" $(printf '%q' "$a")"; done
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$SDJAX_CMD"

# collect: the shared folder once (from worker 0), else one folder per worker
if [[ -n $SHARED ]]; then
  WORKERS=1
elif [[ -z $WORKERS ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    run "${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints.len())'
    echo "# dry run: number of workers unknown, showing worker 0 (give --workers N)"
    WORKERS=1
  else
    WORKERS=$("${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints.len())')
  fi
fi
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "cannot tell the number of workers (got '$WORKERS'); give --workers N"
run mkdir -p "$OUTDIR"
if [[ -n $SHARED ]]; then
  run "${GC[@]}" scp --recurse "$NAME:$SHARED" "$OUTDIR/shared" "${WHERE[@]}" --worker=0
else
  for ((w = 0; w < WORKERS; w++)); do
    run "${GC[@]}" scp --recurse "$NAME:$REMOTE/outputs" "$OUTDIR/worker-$w" "${WHERE[@]}" --worker="$w"
  done
fi

if [[ $DELETE == 1 ]]; then
  run "${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
[[ $DRY_RUN == 1 ]] || echo "tpu_vm.sh: outputs in $OUTDIR"
