#!/usr/bin/env bash
# Pretrain under mpirun: NODES x GPUS_PER_NODE ranks of `python -m fira_dist.pretrain`. Each trainer reads its
# rank from the MPI environment (PMI_RANK / OMPI_COMM_WORLD_RANK), and rank 0's address and a free port are
# broadcast with mpi4py for the process group (unless MASTER_ADDR / MASTER_PORT are set).
#
#   GPUS_PER_NODE=8 MODEL=llama_1b launch/mpirun.sh                          # one node
#   HOSTFILE=launch/hostfile.example NODES=8 GPUS_PER_NODE=8 launch/mpirun.sh   # several nodes
#   CPU, toy size:  DS_ACCELERATOR=cpu GPUS_PER_NODE=2 MODEL=llama_tiny DS_CONFIG=ds_configs/llama_60m_zero2.json \
#                   EXTRA_ARGS="--max-steps 3 --seq-len 16" launch/mpirun.sh
#
# Works with MPICH / Hydra (e.g. pip `mpich`; the whole environment is passed on) and Open MPI (variables
# are passed with -x: PATH, PYTHONPATH, LD_LIBRARY_PATH, VIRTUAL_ENV, MASTER_*, OMP_*, DS_*, NCCL_*, CUDA_*,
# HF_*, TORCH*, FIRA_*). HOSTFILE uses the "<host> slots=<N>" format of launch/hostfile.example (converted to
# "<host>:<N>" for Hydra). Multi-node MPI needs the MPI's own remote start-up (ssh or a scheduler).
# Signals: SIGTERM / SIGUSR1 to this script are forwarded to mpirun as SIGUSR1 (Hydra and Open MPI pass it
# to every rank), the trainers checkpoint and exit 3, and so does this script (run again to resume).
set -euo pipefail

MODEL=${MODEL:-llama_60m}              # a name of fira_dist.models (llama_60m ... llama_7b) or a config.json
NODES=${NODES:-1}                      # nodes (the first NODES hosts of HOSTFILE)
GPUS_PER_NODE=${GPUS_PER_NODE:-auto}   # ranks per node; auto = visible CUDA GPUs (1 without any)
HOSTFILE=${HOSTFILE:-}                 # "<host> slots=<N>" per line; empty: this machine only
STRATEGY=${STRATEGY:-deepspeed}        # deepspeed | ddp | fsdp2
ZERO_STAGE=${ZERO_STAGE:-2}            # picks the default DS_CONFIG: ds_configs/<model>_zero<stage>.json
DS_CONFIG=${DS_CONFIG:-}               # DeepSpeed config (STRATEGY=deepspeed only); default from MODEL and ZERO_STAGE
OUTPUT_DIR=${OUTPUT_DIR:-}             # default runs/<model>-<strategy>
RESUME=${RESUME:-auto}                 # auto (latest complete checkpoint in OUTPUT_DIR) | none | PATH
DATA_ARGS=${DATA_ARGS:-}               # data flags, e.g. "--dataset allenai/c4 --streaming --tokenizer t5-base"
EXTRA_ARGS=${EXTRA_ARGS:-}             # more pretrain flags (split on spaces)
MPIRUN=${MPIRUN:-mpirun}               # the MPI launcher (its MPI must be the one mpi4py was built for)
MPI_ARGS=${MPI_ARGS:-}                 # extra mpirun flags (split on spaces), e.g. "--oversubscribe"
PYTHON=${PYTHON:-python}               # the interpreter that has fira_dist and mpi4py installed

NAME=mpirun.sh
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
is_pos_int "$GPUS_PER_NODE" || die "GPUS_PER_NODE=$GPUS_PER_NODE is not accepted: expected a positive integer (ranks per node) or auto"
is_pos_int "$NODES" || die "NODES=$NODES is not accepted: expected a positive integer"
HOSTS=() SLOTS=()
if [[ -n $HOSTFILE ]]; then
  [[ -f $HOSTFILE ]] || die "HOSTFILE=$HOSTFILE: no such file"
  while read -r host rest; do
    [[ -z $host || $host == \#* ]] && continue
    [[ $rest =~ slots=([0-9]+) ]] || die "HOSTFILE=$HOSTFILE: line '$host $rest' has no slots=<N>"
    HOSTS+=("$host"); SLOTS+=("${BASH_REMATCH[1]}")
  done < "$HOSTFILE"
  (( NODES <= ${#HOSTS[@]} )) || die "NODES=$NODES but HOSTFILE=$HOSTFILE lists ${#HOSTS[@]} host(s)"
  for ((i = 0; i < NODES; i++)); do
    (( GPUS_PER_NODE <= SLOTS[i] )) || die "GPUS_PER_NODE=$GPUS_PER_NODE but ${HOSTS[i]} has slots=${SLOTS[i]} in $HOSTFILE"
  done
elif (( NODES > 1 )); then
  die "NODES=$NODES needs HOSTFILE (one '<host> slots=<N>' line per node)"
fi
[[ -n $MODEL ]] || die "MODEL is empty: expected a model name (llama_60m ... llama_7b) or a config.json path"
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
  ddp|fsdp2) DS_CONFIG=;;
  single) (( NODES * GPUS_PER_NODE == 1 )) || die "STRATEGY=single runs one process: use ddp, fsdp2 or deepspeed"; DS_CONFIG=;;
  *) die "STRATEGY=$STRATEGY is not accepted: expected deepspeed, ddp, fsdp2 or single";;
esac
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL_TAG}-${STRATEGY}}
command -v "$MPIRUN" >/dev/null 2>&1 || die "MPIRUN=$MPIRUN not found (pip install mpich, or load your MPI module)"
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found: activate the environment that has fira_dist installed"

# --- command ---------------------------------------------------------------------------------------------
NP=$((NODES * GPUS_PER_NODE))
VERSION=$("$MPIRUN" --version 2>&1 || true)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MPI=("$MPIRUN")
if [[ $VERSION == *"Open MPI"* || $VERSION == *OpenRTE* || $VERSION == *"(Open MPI)"* ]]; then
  FLAVOR=openmpi
  MPI+=(-np "$NP" --map-by "ppr:$GPUS_PER_NODE:node")
  [[ -n $HOSTFILE ]] && MPI+=(--hostfile "$HOSTFILE")
  (( EUID == 0 )) && MPI+=(--allow-run-as-root)
  for v in $(compgen -e); do
    case $v in PATH|PYTHONPATH|LD_LIBRARY_PATH|VIRTUAL_ENV|MASTER_*|OMP_*|DS_*|NCCL_*|CUDA_*|HF_*|TORCH*|FIRA_*) MPI+=(-x "$v");; esac
  done
elif [[ $VERSION == *HYDRA* || $VERSION == *MPICH* || $VERSION == *"Intel(R) MPI"* ]]; then
  FLAVOR=hydra
  MPI+=(-n "$NP" -ppn "$GPUS_PER_NODE")
  if [[ -n $HOSTFILE ]]; then
    HYDRA_HOSTS=$(mktemp "${TMPDIR:-/tmp}/fira-hosts.XXXXXX")
    trap 'rm -f "$HYDRA_HOSTS"' EXIT
    for ((i = 0; i < NODES; i++)); do echo "${HOSTS[i]}:${SLOTS[i]}"; done > "$HYDRA_HOSTS"
    MPI+=(-f "$HYDRA_HOSTS")
  fi
else
  die "MPIRUN=$MPIRUN: cannot tell its MPI from '$MPIRUN --version' (expected MPICH/Hydra or Open MPI)"
fi
read -r -a _mpi <<< "$MPI_ARGS"
read -r -a _data <<< "$DATA_ARGS"
read -r -a _extra <<< "$EXTRA_ARGS"
ARGS=(--model "$MODEL" --strategy "$STRATEGY" --output-dir "$OUTPUT_DIR" --resume "$RESUME")
[[ -n $DS_CONFIG ]] && ARGS+=(--deepspeed "$DS_CONFIG")
ARGS+=("${_data[@]}" "${_extra[@]}" "$@")
CMD=("${MPI[@]}" "${_mpi[@]}" "$PYTHON" -m fira_dist.pretrain "${ARGS[@]}")
echo "[launch] $NAME: MODEL=$MODEL STRATEGY=$STRATEGY DS_CONFIG=${DS_CONFIG:--} NODES=$NODES GPUS_PER_NODE=$GPUS_PER_NODE MPI=$FLAVOR OUTPUT_DIR=$OUTPUT_DIR"
echo "[launch] ${CMD[*]}"

# --- run; SIGTERM/SIGUSR1 -> SIGUSR1 to mpirun, which passes it to every rank ---------------------------
SIGNALED= TRAPS=0
forward() {
  SIGNALED=$1 TRAPS=$((TRAPS + 1))
  echo "[launch] got SIG$1: asking the trainers to checkpoint and stop (SIGUSR1 via $MPIRUN)" >&2
  kill -s USR1 "$PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${CMD[@]}" &
PID=$!
while :; do  # a trap interrupts `wait` (status > 128): wait again until the job itself has ended
  seen=$TRAPS; rc=0; wait "$PID" || rc=$?
  (( TRAPS == seen )) && break
done
if [[ $rc -eq 3 || ( -n $SIGNALED && $rc -ne 0 ) ]]; then
  echo "[launch] stopped after SIG${SIGNALED:-?} (exit $rc): run again with the same OUTPUT_DIR to resume (exit 3)" >&2
  exit 3
fi
exit "$rc"
