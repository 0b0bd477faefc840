#!/usr/bin/env bash
# Start one torchrun agent on this node and run COMMAND in every worker it spawns.
#
#   launch/torchrun.sh COMMAND [ARGS...]
#   e.g. launch/torchrun.sh afb-scale train --config configs/quickstart.yaml
#        NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh afb-scale train --config ...
#
# The command is run as is (torchrun --no-python), so `afb-scale train ...` and
# `python -m afb_scale.cli train ...` both work; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT in each worker.
#
# Settings (environment):
#   NPROC_PER_NODE  workers on this node. Default: the number of GPUs this process may use --
#                   the entries of CUDA_VISIBLE_DEVICES when it is set (up to the first invalid
#                   one, as CUDA reads it: "", -1 and Slurm's NoDevFiles mean none), otherwise
#                   `nvidia-smi --list-gpus`; 1 when that gives no GPU (a CPU run).
#   NNODES          nodes taking part (default 1)
#   MASTER_ADDR     host of the rendezvous (node rank 0 / the first node); default 127.0.0.1
#   MASTER_PORT     its port (default 29500)
#   RDZV_BACKEND    c10d | static | standalone. Default: standalone for one node without
#                   MASTER_ADDR; static when NODE_RANK is set; c10d otherwise.
#   NODE_RANK       this node's rank for the static rendezvous (default: SLURM_NODEID)
#   RDZV_ID         rendezvous id for c10d; all agents of one job must agree (default: SLURM_JOB_ID)
#   MAX_RESTARTS    torchrun --max-restarts (default 0: a failed worker fails this agent; under
#                   Slurm the batch script then re-runs the whole step from the newest complete
#                   checkpoint, see launch/slurm/train.sbatch)
#   AFB_PYTHON      interpreter that runs torch.distributed.run (default python)
#   AFB_PREEMPT_SIGNAL  the preemption signal, USR1 (see "Signals" below)
#   AFB_REQUEUE_EXIT_CODE  status meaning "checkpointed, please requeue" (75, EX_TEMPFAIL)
#   AFB_DRY_RUN=1   print the afb-launch line and the torchrun command line, then exit 0
#                   without starting anything (to check what a node would run)
#
# Signals: the preemption signal (SIGUSR1) means "finish the step, checkpoint, exit 75". The
# torchrun agent does not handle SIGUSR1 (its default action would kill the agent and orphan the
# workers), so the agent starts with SIGUSR1 ignored; the workers inherit that until the trainer
# installs its own handler, so an early signal kills nothing.
#   Under Slurm, slurmstepd delivers a step signal (scancel --signal, srun forwarding, --signal
#   without B:) and SIGTERM to every process of the step, agent and workers alike (verified with
#   proctrack/linuxproc; cgroup tracking does the same), so this script forwards nothing there:
#   a second SIGTERM would cut short the agent's graceful shutdown of the workers.
#   Outside Slurm only this script may be signalled, so it forwards SIGUSR1 to the workers (the
#   agent's children) and SIGTERM to the agent, which shuts the workers down with SIGTERM.
# The agent reports any non-zero worker exit as its own status 1, so when a preemption signal
# was received and torchrun failed, this script exits with AFB_REQUEUE_EXIT_CODE, the status the
# Slurm batch script requeues on.
#
# Exit status: 0; 75 after a preemption signal (above); otherwise, when a worker failed, the exit
# status of torchrun's "root cause" (the first worker that failed on this node) when it exited
# with one (1-125), else torchrun's own. Bad input (a worker printed `error: ...` and exited 2):
# torchrun prints its ChildFailedError report after the workers' output, so this script prints
# the worker's error line again as the last line and exits 2. To do that the agent's stderr (its
# own and its workers') passes through a small filter that copies it as it comes and remembers
# the last `error: ` line and the root cause's status; the filter ignores INT, TERM and the
# preemption signal, so it keeps copying until every writer has gone.
# Signal handlers and the helper they call run from traps, which shellcheck cannot see.
# shellcheck disable=SC2317
set -euo pipefail
# The whole script is one compound command ({ ... } below), which bash reads completely before it
# runs any of it: a checkout updated while a job runs (git pull) cannot change this script under
# an agent that is still waiting for its workers.
{

if [ "$#" -eq 0 ]; then
    echo "usage: launch/torchrun.sh COMMAND [ARGS...]" >&2
    exit 2
fi

# GPUs this process may use. CUDA_VISIBLE_DEVICES, when set, is what CUDA sees (Slurm's
# --gpus-per-node sets it, so does a user restricting a node): nvidia-smi lists every GPU of the
# machine regardless, and one worker per listed GPU would hand out ordinals that do not exist.
# CUDA reads the comma-separated list up to the first invalid entry; "" and "-1" hide every GPU,
# and Slurm sets "NoDevFiles" when the job has none.
visible_gpus() {
    local entry n=0
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local -a entries=()
        IFS=, read -r -a entries <<<"$CUDA_VISIBLE_DEVICES"
        for entry in "${entries[@]}"; do
            entry=${entry// /}
            case "$entry" in
                "" | -* | NoDevFiles) break ;;
            esac
            n=$((n + 1))
        done
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ') || n=0
    fi
    echo "$n"
}

default_nproc() {
    local n
    n=$(visible_gpus)
    if [ "$n" -gt 0 ]; then echo "$n"; else echo 1; fi
}

NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PREEMPT_SIGNAL=${AFB_PREEMPT_SIGNAL:-USR1}
REQUEUE_EXIT_CODE=${AFB_REQUEUE_EXIT_CODE:-75}
NODE_NAME=${SLURMD_NODENAME:-$(hostname)}

if [ -z "${RDZV_BACKEND:-}" ]; then
    if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
        RDZV_BACKEND=standalone
    elif [ -n "${NODE_RANK:-}" ]; then
        RDZV_BACKEND=static
    else
        RDZV_BACKEND=c10d
    fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

TORCHRUN=("${AFB_PYTHON:-python}" -m torch.distributed.run
    --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS")
case "$RDZV_BACKEND" in
    standalone)
        # One node: torchrun picks a free local port for its own c10d store.
        TORCHRUN+=(--standalone --nnodes=1)
        NODE_DESC="node_rank=0"
        ;;
    static)
        # Fixed ranks: node rank 0 must run on MASTER_ADDR, where it hosts the TCP store.
        NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
        if [ -z "$NODE_RANK" ]; then
            echo "torchrun.sh: RDZV_BACKEND=static needs NODE_RANK (or SLURM_NODEID)" >&2
            exit 2
        fi
        TORCHRUN+=(--nnodes="$NNODES" --node-rank="$NODE_RANK"
            --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
        NODE_DESC="node_rank=$NODE_RANK"
        ;;
    c10d)
        # Elastic rendezvous: ranks are assigned when all NNODES agents have joined; the agent
        # on MASTER_ADDR hosts the store (the others fall back to clients).
        RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-}}
        if [ -z "$RDZV_ID" ]; then
            echo "torchrun.sh: RDZV_BACKEND=c10d needs RDZV_ID (or SLURM_JOB_ID)" >&2
            exit 2
        fi
        TORCHRUN+=(--nnodes="$NNODES" --rdzv-backend=c10d
            --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID")
        NODE_DESC="rdzv_id=$RDZV_ID"
        ;;
    *)
        echo "torchrun.sh: RDZV_BACKEND=$RDZV_BACKEND is not one of standalone, static, c10d" >&2
        exit 2
        ;;
esac
TORCHRUN+=(--no-python "$@")

echo "afb-launch node=$NODE_NAME host=$(hostname) nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE" \
    "rdzv=$RDZV_BACKEND $NODE_DESC master=$MASTER_ADDR:$MASTER_PORT"
if [ "${AFB_DRY_RUN:-0}" = 1 ]; then
    printf 'afb-launch dry run (AFB_DRY_RUN=1), would run:'
    printf ' %q' "${TORCHRUN[@]}"
    printf '\n'
    exit 0
fi

# Children of a process, from /proc (procps is not in slim images).
children_of() {
    local status ppid
    for status in /proc/[0-9]*/status; do
        ppid=$(awk '/^PPid:/ {print $2}' "$status" 2>/dev/null) || continue
        if [ "$ppid" = "$1" ]; then
            basename "$(dirname "$status")"
        fi
    done
}

# Slurm sets SLURM_STEP_ID in the tasks of a step; its signals then reach every process.
IN_SLURM_STEP=0
if [ -n "${SLURM_STEP_ID:-}" ]; then IN_SLURM_STEP=1; fi

PREEMPTED=0
on_preempt() {
    PREEMPTED=1
    echo "afb-launch node=$NODE_NAME: got SIG$PREEMPT_SIGNAL (preemption)"
    if [ "$IN_SLURM_STEP" -eq 0 ]; then
        local pid
        for pid in $(children_of "$AGENT_PID"); do
            kill -s "$PREEMPT_SIGNAL" "$pid" 2>/dev/null || true
        done
    fi
}
on_term() {
    echo "afb-launch node=$NODE_NAME: got SIGTERM"
    if [ "$IN_SLURM_STEP" -eq 0 ]; then
        kill -s TERM "$AGENT_PID" 2>/dev/null || true
    fi
}

# The stderr filter: copies stdin to stderr unchanged, chunk by chunk, and at end of input writes
# two lines to FILE: the exit status of torchrun's root-cause worker (empty if none was
# reported) and the last line that starts with "error: " (empty if none).
STDERR_FILTER='
import os, re, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIG" + os.environ.get("AFB_PREEMPT_SIGNAL", "USR1")):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
code, first_code, error, in_root, pending = "", "", b"", False, b""
exit_re = re.compile(rb"\s*exitcode\s*:\s*(-?\d+)|.*failed \(exitcode: (-?\d+)\)")

def scan(line):
    global code, first_code, error, in_root
    line = line.rstrip(b"\r")
    if line.startswith(b"error: "):
        error = line
    if b"Root Cause" in line:
        in_root = True
    m = exit_re.match(line)
    if m:
        value = (m.group(1) or m.group(2)).decode()
        first_code = first_code or value
        if in_root and not code:
            code = value

while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    view = memoryview(chunk)
    while view:
        try:
            view = view[os.write(2, view):]
        except OSError:  # our stderr is gone: keep reading, so that no writer gets EPIPE
            break
    *lines, pending = (pending + chunk).split(b"\n")
    for line in lines:
        scan(line)
scan(pending)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write((code or first_code) + "\n" + error.decode("utf-8", "replace") + "\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
'
FILTER_PID=""
AFB_TMP=$(mktemp -d "${TMPDIR:-/tmp}/afb-launch.XXXXXX" 2>/dev/null) || AFB_TMP=""
if [ -n "$AFB_TMP" ] && mkfifo "$AFB_TMP/stderr" 2>/dev/null; then
    trap 'rm -rf "$AFB_TMP"' EXIT
    (trap '' INT TERM HUP "$PREEMPT_SIGNAL"; exec "${AFB_PYTHON:-python}" -c "$STDERR_FILTER" "$AFB_TMP/summary") \
        <"$AFB_TMP/stderr" &
    FILTER_PID=$!
    (trap '' "$PREEMPT_SIGNAL"; exec "${TORCHRUN[@]}") 2>"$AFB_TMP/stderr" &
else
    echo "afb-launch node=$NODE_NAME: no temporary directory for the stderr filter; running torchrun unfiltered" >&2
    (trap '' "$PREEMPT_SIGNAL"; exec "${TORCHRUN[@]}") &
fi
AGENT_PID=$!
trap on_preempt "$PREEMPT_SIGNAL"
trap on_term TERM

# `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting while the
# agent lives. Once it is gone, one more `wait` returns its real status if the last one was cut
# short (bash keeps the status of a reaped child until it is collected), or 127 if it was not.
set +e
while :; do
    wait "$AGENT_PID"
    rc=$?
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
        wait "$AGENT_PID" 2>/dev/null
        late=$?
        if [ "$late" -ne 127 ]; then rc=$late; fi
        break
    fi
done

# The filter ends once every writer of the agent's stderr has gone (the agent stops its workers
# before it exits). A worker that outlived its agent would hold it open: wait a bounded time.
root_code="" error_line=""
if [ -n "$FILTER_PID" ]; then
    for _ in $(seq 300); do
        kill -0 "$FILTER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -f "$AFB_TMP/summary" ]; then
        { IFS= read -r root_code; IFS= read -r error_line; } <"$AFB_TMP/summary" || true
    fi
fi
set -e

if [ "$PREEMPTED" -eq 1 ] && [ "$rc" -ne 0 ]; then
    echo "afb-launch node=$NODE_NAME: torchrun exited $rc after preemption; exiting $REQUEUE_EXIT_CODE (requeue)"
    exit "$REQUEUE_EXIT_CODE"
fi
if [ "$rc" -ne 0 ] && [ "$root_code" = 2 ] && [ -n "$error_line" ]; then
    # Bad input: the one line that says what to fix comes last, after torchrun's report.
    echo "afb-launch node=$NODE_NAME: a worker rejected its input (exit status 2); its error, again:" >&2
    printf '%s\n' "$error_line" >&2
    exit 2
fi
if [ "$rc" -ne 0 ] && [[ "$root_code" =~ ^[0-9]+$ ]] && [ "$root_code" -ge 1 ] && [ "$root_code" -le 125 ]; then
    exit "$root_code"
fi
exit "$rc"
}
