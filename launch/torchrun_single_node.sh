#!/usr/bin/env bash
# Pretrain on ONE node: torchrun --standalone starts GPUS_PER_NODE processes of `python -m fira_dist.pretrain`.
#
#   launch/torchrun_single_node.sh [extra pretrain flags...]
#   MODEL=llama_130m GPUS_PER_NODE=8 ZERO_STAGE=1 launch/torchrun_single_node.sh
#   STRATEGY=fsdp2 MODEL=llama_350m launch/torchrun_single_node.sh --max-steps 1000
#   CPU, toy size:  DS_ACCELERATOR=cpu GPUS_PER_NODE=2 MODEL=llama_tiny DS_CONFIG=ds_configs/llama_60m_zero2.json \
#                   EXTRA_ARGS="--max-steps 3 --seq-len 16" launch/torchrun_single_node.sh
#
# Run it from the repository root (relative paths are relative to the current directory). Every variable
# below can be set in the environment; arguments after the script name are appended to the pretrain flags.
# Signals: SIGTERM / SIGUSR1 to this script are forwarded to the trainers (SIGUSR1), which checkpoint and
# exit; the script then exits 3 (EXIT_REQUEUE): run it again and `--resume auto` continues from there.
set -euo pipefail

MODEL=${MODEL:-llama_60m}              # a name of fira_dist.models (llama_60m ... llama_7b) or a config.json
GPUS_PER_NODE=${GPUS_PER_NODE:-auto}   # processes on this node; auto = visible CUDA GPUs (1 without any)
STRATEGY=${STRATEGY:-deepspeed}        # deepspeed | ddp | fsdp2 | single (single needs GPUS_PER_NODE=1)
ZERO_STAGE=${ZERO_STAGE:-2}            # picks the default DS_CONFIG: ds_configs/<model>_zero<stage>.json
DS_CONFIG=${DS_CONFIG:-}               # DeepSpeed config (STRATEGY=deepspeed only); default from MODEL and ZERO_STAGE
OUTPUT_DIR=${OUTPUT_DIR:-}             # checkpoints, metrics.jsonl, logs; default runs/<model>-<strategy>
RESUME=${RESUME:-auto}                 # auto (latest complete checkpoint in OUTPUT_DIR) | none | PATH
DATA_ARGS=${DATA_ARGS:-}               # data flags, e.g. "--dataset allenai/c4 --streaming --tokenizer t5-base"
EXTRA_ARGS=${EXTRA_ARGS:-}             # more pretrain flags (split on spaces), e.g. "--max-steps 100 --log-every 10"
PYTHON=${PYTHON:-python}               # the interpreter that has fira_dist installed
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}  # s torchrun waits for trainers to checkpoint after a signal (torch >= 2.9)

NAME=torchrun_single_node.sh
die() { echo "$NAME: error: $*" >&2; exit 2; }
is_pos_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# --- validate ------------------------------------------------------------------------------------------
if [[ $GPUS_PER_NODE == auto ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a _devs <<< "$CUDA_VISIBLE_DEVICES"; GPUS_PER_NODE=${#_devs[@]}
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU ' || true)
  fi
  is_pos_int "$GPUS_PER_NODE" || GPUS_PER_NODE=1
fi
is_pos_int "$GPUS_PER_NODE" || die "GPUS_PER_NODE=$GPUS_PER_NODE is not accepted: expected a positive integer (processes on this node) or auto"
[[ -n $MODEL ]] || die "MODEL is empty: expected a model name (llama_60m, llama_130m, llama_350m, llama_1b, llama_7b, ...) or a config.json path"
if [[ $MODEL == */* || $MODEL == *.json ]]; then
  [[ -f $MODEL || -f $MODEL/config.json ]] || die "MODEL=$MODEL: no such config file"
fi
MODEL_TAG=$(basename "${MODEL%.json}")
case $STRATEGY in
  deepspeed)
    if [[ -z $DS_CONFIG ]]; then
      [[ $ZERO_STAGE =~ ^[0-3]$ ]] || die "ZERO_STAGE=$ZERO_STAGE is not accepted: expected 0, 1, 2 or 3"
      DS_CONFIG=ds_configs/${MODEL_TAG}_zero${ZERO_STAGE}.json
      [[ -f $DS_CONFIG ]] || die "no per-size DeepSpeed config $DS_CONFIG for MODEL=$MODEL: set DS_CONFIG (e.g. DS_CONFIG=ds_configs/llama_60m_zero2.json with a small model)"
    fi
    [[ -f $DS_CONFIG ]] || die "DS_CONFIG=$DS_CONFIG: no such file (run from the repository root, or give an absolute path)";;
  ddp|fsdp2) [[ -z $DS_CONFIG ]] || echo "$NAME: note: DS_CONFIG=$DS_CONFIG is ignored with STRATEGY=$STRATEGY" >&2; DS_CONFIG=;;
  single) [[ $GPUS_PER_NODE == 1 ]] || die "STRATEGY=single runs one process, but GPUS_PER_NODE=$GPUS_PER_NODE: use ddp, fsdp2 or deepspeed"
          DS_CONFIG=;;
  *) die "STRATEGY=$STRATEGY is not accepted: expected deepspeed, ddp, fsdp2 or single";;
esac
[[ $SHUTDOWN_TIMEOUT =~ ^[0-9]+$ ]] || die "SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT is not accepted: expected seconds (an integer)"
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL_TAG}-${STRATEGY}}
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found: activate the environment that has fira_dist installed"

# --- command ---------------------------------------------------------------------------------------------
read -r -a _data <<< "$DATA_ARGS"
read -r -a _extra <<< "$EXTRA_ARGS"
ARGS=(--model "$MODEL" --strategy "$STRATEGY" --output-dir "$OUTPUT_DIR" --resume "$RESUME")
[[ -n $DS_CONFIG ]] && ARGS+=(--deepspeed "$DS_CONFIG")
ARGS+=("${_data[@]}" "${_extra[@]}" "$@")

# torchrun forwards these signals to the trainers and waits SHUTDOWN_TIMEOUT s before SIGKILL (torch >= 2.9
# reads them; older versions ignore the variables and forward only SIGTERM/SIGINT/SIGHUP/SIGQUIT).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
CMD=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$GPUS_PER_NODE" --max-restarts=0
     -m fira_dist.pretrain "${ARGS[@]}")
echo "[launch] $NAME: MODEL=$MODEL STRATEGY=$STRATEGY DS_CONFIG=${DS_CONFIG:--} GPUS_PER_NODE=$GPUS_PER_NODE OUTPUT_DIR=$OUTPUT_DIR"
echo "[launch] ${CMD[*]}"

# --- run; forward SIGTERM/SIGUSR1 as SIGUSR1 (checkpoint, exit 3) ---------------------------------------
SIGNALED= TRAPS=0
forward() {
  SIGNALED=$1 TRAPS=$((TRAPS + 1))
  echo "[launch] got SIG$1: asking the trainers to checkpoint and stop (SIGUSR1)" >&2
  kill -s USR1 "$PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
START=$(date +%s)
"${CMD[@]}" &
PID=$!
while :; do  # a trap interrupts `wait` (status > 128): wait again until the job itself has ended
  seen=$TRAPS; rc=0; wait "$PID" || rc=$?
  (( TRAPS == seen )) && break
done
# torchrun reports 1 for any failing trainer: rank 0's OUTPUT_DIR/exit_status.json has the real code
if (( rc != 0 )) && [[ -f $OUTPUT_DIR/exit_status.json ]] && (( $(stat -c %Y "$OUTPUT_DIR/exit_status.json") >= START )); then
  code=$(sed -n 's/.*"exit_code": *\([0-9][0-9]*\).*/\1/p' "$OUTPUT_DIR/exit_status.json" | head -n1)
  [[ -n $code ]] && echo "[launch] torchrun exited $rc; the trainers exited $code ($OUTPUT_DIR/exit_status.json)" && rc=$code
fi
if [[ $rc -eq 3 || ( -n $SIGNALED && $rc -ne 0 ) ]]; then
  echo "[launch] stopped after SIG${SIGNALED:-?} (exit $rc): run again with the same OUTPUT_DIR to resume (exit 3)" >&2
  exit 3
fi
exit "$rc"
