#!/usr/bin/env bash
# Pretrain with the `deepspeed` launcher over the nodes of a hostfile (DeepSpeed strategy, ZeRO 1/2/3).
#
#   HOSTFILE=launch/hostfile.example MODEL=llama_7b launch/deepspeed_multinode.sh        # 8 x 8 GPUs over pdsh/ssh
#   HOSTFILE=hosts LAUNCHER=slurm launch/deepspeed_multinode.sh     # inside a Slurm allocation: srun starts the ranks
#   NO_SSH=1 NODE_RANK=$i HOSTFILE=hosts launch/deepspeed_multinode.sh   # run on every node yourself (no ssh)
#   CPU, one node, toy size:
#     printf 'localhost slots=2\n' > /tmp/hosts
#     DS_ACCELERATOR=cpu HOSTFILE=/tmp/hosts MODEL=llama_tiny DS_CONFIG=ds_configs/llama_60m_zero2.json \
#       EXTRA_ARGS="--max-steps 3 --seq-len 16" launch/deepspeed_multinode.sh
#
# A hostfile has one line per node: "<host> slots=<GPUs>" (launch/hostfile.example). What a real multi-node
# run needs depends on LAUNCHER (the deepspeed launcher's backend):
#   pdsh (default): `pdsh` on this node and passwordless ssh from it to every node; DeepSpeed passes the
#     variables named in ~/.deepspeed_env or ./.deepspeed_env (KEY=VALUE lines) plus NCCL_*/PYTHON*/UCX_*.
#   slurm: run inside an allocation (salloc/sbatch) that covers the hostfile's nodes; srun starts the ranks.
#   openmpi | mpich | impi | mvapich: that MPI's mpirun, configured for the nodes.
#   NO_SSH=1: start this script on every node with NODE_RANK=0..N-1 (any scheduler); no ssh needed.
# Every node needs the same repository path and environment, and OUTPUT_DIR on a shared filesystem.
# Signals: SIGTERM / SIGUSR1 to this script send SIGUSR1 to the trainers it started on this node (and through
# srun / mpirun, on every node), which checkpoint and exit; the script then exits 3 (run again to resume).
# Under pdsh, trainers on other nodes are not reached this way: signal them there.
set -euo pipefail

HOSTFILE=${HOSTFILE:-hostfile}         # "<host> slots=<GPUs>" per line (see launch/hostfile.example)
NODES=${NODES:-}                       # nodes to use: the first NODES of the hostfile (default: all)
GPUS_PER_NODE=${GPUS_PER_NODE:-}       # ranks per node (default: the smallest slots= of the used hosts)
MASTER_ADDR=${MASTER_ADDR:-}           # rendezvous host (default: the first host; localhost -> 127.0.0.1)
MASTER_PORT=${MASTER_PORT:-29500}      # rendezvous port
LAUNCHER=${LAUNCHER:-pdsh}             # pdsh | slurm | openmpi | mpich | impi | mvapich (multi-node backend)
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}       # extra arguments for that backend (e.g. srun or mpirun flags)
NO_SSH=${NO_SSH:-0}                    # 1: run only this node's ranks (NODE_RANK); start the script on every node
NODE_RANK=${NODE_RANK:-}               # this node's index in the hostfile (NO_SSH=1 only)
MODEL=${MODEL:-llama_7b}               # a name of fira_dist.models (llama_60m ... llama_7b) or a config.json
ZERO_STAGE=${ZERO_STAGE:-2}            # picks the default DS_CONFIG: ds_configs/<model>_zero<stage>.json
DS_CONFIG=${DS_CONFIG:-}               # DeepSpeed config; default from MODEL and ZERO_STAGE
OUTPUT_DIR=${OUTPUT_DIR:-}             # default runs/<model>-deepspeed
RESUME=${RESUME:-auto}                 # auto (latest complete checkpoint in OUTPUT_DIR) | none | PATH
DATA_ARGS=${DATA_ARGS:-}               # data flags, e.g. "--dataset allenai/c4 --streaming --tokenizer t5-base"
EXTRA_ARGS=${EXTRA_ARGS:-}             # more pretrain flags (split on spaces)
PYTHON=${PYTHON:-python}               # the interpreter that has fira_dist and deepspeed installed

NAME=deepspeed_multinode.sh
die() { echo "$NAME: error: $*" >&2; exit 2; }
is_pos_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENTRY=$HERE/pretrain_entry.py          # == python -m fira_dist.pretrain, as a file (see that file)

# --- validate ------------------------------------------------------------------------------------------
[[ -f $HOSTFILE ]] || die "HOSTFILE=$HOSTFILE: no such file; write one line per node, '<host> slots=<GPUs>' (see launch/hostfile.example)"
HOSTS=() SLOTS=()
while read -r host rest; do
  [[ -z $host || $host == \#* ]] && continue
  [[ $rest =~ slots=([0-9]+) ]] || die "HOSTFILE=$HOSTFILE: line '$host $rest' has no slots=<N>"
  HOSTS+=("$host"); SLOTS+=("${BASH_REMATCH[1]}")
done < "$HOSTFILE"
(( ${#HOSTS[@]} )) || die "HOSTFILE=$HOSTFILE lists no host"
NODES=${NODES:-${#HOSTS[@]}}
is_pos_int "$NODES" || die "NODES=$NODES is not accepted: expected a positive integer"
(( NODES <= ${#HOSTS[@]} )) || die "NODES=$NODES but HOSTFILE=$HOSTFILE lists ${#HOSTS[@]} host(s)"
if [[ -z $GPUS_PER_NODE ]]; then
  GPUS_PER_NODE=${SLOTS[0]}
  for ((i = 1; i < NODES; i++)); do (( SLOTS[i] < GPUS_PER_NODE )) && GPUS_PER_NODE=${SLOTS[i]}; done
fi
is_pos_int "$GPUS_PER_NODE" || die "GPUS_PER_NODE=$GPUS_PER_NODE is not accepted: expected a positive integer"
for ((i = 0; i < NODES; i++)); do
  (( GPUS_PER_NODE <= SLOTS[i] )) || die "GPUS_PER_NODE=$GPUS_PER_NODE but ${HOSTS[i]} has slots=${SLOTS[i]} in $HOSTFILE"
done
case $LAUNCHER in pdsh|slurm|openmpi|mpich|impi|mvapich) ;;
  *) die "LAUNCHER=$LAUNCHER is not accepted: expected pdsh, slurm, openmpi, mpich, impi or mvapich";; esac
[[ $NO_SSH == 0 || $NO_SSH == 1 ]] || die "NO_SSH=$NO_SSH is not accepted: expected 0 or 1"
if [[ $NO_SSH == 1 ]]; then
  [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) \
    || die "NO_SSH=1 needs NODE_RANK in 0..$((NODES - 1)) (this node's line in $HOSTFILE), got '${NODE_RANK}'"
fi
if [[ -z $MASTER_ADDR ]]; then
  MASTER_ADDR=${HOSTS[0]}
  [[ $MASTER_ADDR == localhost ]] && MASTER_ADDR=127.0.0.1
fi
is_pos_int "$MASTER_PORT" || die "MASTER_PORT=$MASTER_PORT is not accepted: expected a port number"
[[ -n $MODEL ]] || die "MODEL is empty: expected a model name (llama_60m ... llama_7b) or a config.json path"
if [[ $MODEL == */* || $MODEL == *.json ]]; then
  [[ -f $MODEL || -f $MODEL/config.json ]] || die "MODEL=$MODEL: no such config file"
fi
MODEL_TAG=$(basename "${MODEL%.json}")
if [[ -z $DS_CONFIG ]]; then
  [[ $ZERO_STAGE =~ ^[0-3]$ ]] || die "ZERO_STAGE=$ZERO_STAGE is not accepted: expected 0, 1, 2 or 3"
  DS_CONFIG=ds_configs/${MODEL_TAG}_zero${ZERO_STAGE}.json
  [[ -f $DS_CONFIG ]] || die "no per-size DeepSpeed config $DS_CONFIG for MODEL=$MODEL: set DS_CONFIG (e.g. DS_CONFIG=ds_configs/llama_60m_zero2.json with a small model)"
fi
[[ -f $DS_CONFIG ]] || die "DS_CONFIG=$DS_CONFIG: no such file (run from the repository root, or give an absolute path)"
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL_TAG}-deepspeed}
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found: activate the environment that has fira_dist installed"
"$PYTHON" -c "import deepspeed.launcher.runner" >/dev/null 2>&1 || die "PYTHON=$PYTHON cannot import deepspeed"

# --- command ---------------------------------------------------------------------------------------------
# One host, or NO_SSH: the launcher starts the local ranks itself (no ssh check). Several hosts: the backend.
LOCAL_ONLY=0
if (( NODES == 1 )) || [[ $NO_SSH == 1 ]]; then LOCAL_ONLY=1; fi
DS=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
# trim the hostfile only when asked to (the slurm backend turns --num_gpus into `srun --gpus-per-node`)
(( NODES < ${#HOSTS[@]} )) && DS+=(--num_nodes "$NODES")
for ((i = 0; i < NODES; i++)); do
  if (( GPUS_PER_NODE < SLOTS[i] )); then DS+=(--num_gpus "$GPUS_PER_NODE"); break; fi
done
if [[ $NO_SSH == 1 ]]; then
  DS+=(--no_ssh --node_rank "$NODE_RANK")
elif (( LOCAL_ONLY )); then
  DS+=(--no_ssh_check)
else
  DS+=(--launcher "$LAUNCHER")
  [[ -n $LAUNCHER_ARGS ]] && DS+=(--launcher_args "$LAUNCHER_ARGS")
  [[ $LAUNCHER != pdsh ]] && DS+=(--no_ssh_check)
fi
read -r -a _data <<< "$DATA_ARGS"
read -r -a _extra <<< "$EXTRA_ARGS"
ARGS=(--model "$MODEL" --strategy deepspeed --deepspeed "$DS_CONFIG" --output-dir "$OUTPUT_DIR" --resume "$RESUME"
      "${_data[@]}" "${_extra[@]}" "$@")
CMD=("${DS[@]}" "$ENTRY" "${ARGS[@]}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MASTER_ADDR MASTER_PORT  # the slurm / MPI backends start the ranks with this environment
echo "[launch] $NAME: MODEL=$MODEL DS_CONFIG=$DS_CONFIG NODES=$NODES GPUS_PER_NODE=$GPUS_PER_NODE" \
     "MASTER=$MASTER_ADDR:$MASTER_PORT LAUNCHER=$(if [[ $NO_SSH == 1 ]]; then echo "no_ssh NODE_RANK=$NODE_RANK"
     elif ((LOCAL_ONLY)); then echo local; else echo "$LAUNCHER"; fi) OUTPUT_DIR=$OUTPUT_DIR"
echo "[launch] ${CMD[*]}"

# --- run; SIGTERM/SIGUSR1 -> SIGUSR1 to the trainers (or to srun/mpirun, which pass it on) ---------------
signal_trainers() {
  local queue=("$PID") p c args
  while (( ${#queue[@]} )); do
    p=${queue[0]}; queue=("${queue[@]:1}")
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null || true); do
      queue+=("$c")
      args=$(tr '\0' ' ' < "/proc/$c/cmdline" 2>/dev/null) || continue
      case " $args " in
        *deepspeed.launcher*|"pdsh "*|*"/pdsh "*|"ssh "*|*"/ssh "*) ;;  # launchers: SIGUSR1 would kill them
        *" $ENTRY "*) kill -s USR1 "$c" 2>/dev/null && echo "[launch] SIGUSR1 -> pid $c" >&2 ;;
      esac
    done
  done
}
SIGNALED= TRAPS=0
forward() {
  SIGNALED=$1 TRAPS=$((TRAPS + 1))
  echo "[launch] got SIG$1: asking the trainers to checkpoint and stop (SIGUSR1)" >&2
  signal_trainers
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
