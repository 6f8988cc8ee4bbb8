#!/usr/bin/env bash
# GPU check (issue 19): run BY HAND on a machine with one NVIDIA H100/H200, never in CI.
#
# Runs each piece under its own time limit, inside a total budget (8 minutes by default), and
# prints ONE markdown table at the end, also written to $OUT/gpu-check.md (bench-out/ when OUT is
# unset), with the pieces' logs beside it (gpu-check.log), train_step.py's and rewrite.py's JSONs.
# A piece that fails or runs out of time is a FAILED row with its log's last error line.
#
#   env          Python, torch, the GPU; which packages surd needs here are missing
#   train_step   bench/train_step.py --size sd15 --batch-size 32 (bf16): (a) surd, (b) ceiling,
#                (c) released, samples/s
#   train_e2e    `surd train` on tiny models on CUDA: uninterrupted, SIGKILLed after step 5,
#                resumed; max abs diff of the final adapter weights and the history
#   screen       `surd build screen --clip-model` (tiny CLIP), items/s, on cuda
#   rewrite      `surd build rewrite --rewriter hf:` (tiny Llama), prompts/s, on cuda
#   rewrite_vlm  bench/rewrite.py's vlm part on cuda: the tiny Idefics3 VLM (the pipeline's
#                overhead, not a real model) over 512x384 JPEGs, images/s one at a time and
#                batched (8, 32), 16 tokens each, and the vlm judge's pairs/s (~30 s). JSON:
#                rewrite-vlm.json; the row is rewrite.py's own (--row)
#   train_step_sdxl      bench/train_step.py --size sdxl --batch-size 8 (bf16, 1024 px, SDXL-base's
#                UNet, gradient checkpointing on, 3 short rounds, ~90 s): (a) surd, (b) ceiling,
#                samples/s and peak GiB; no (c): the released trainer never ran SDXL. JSON:
#                train-step-sdxl.json; the row is train_step.py's own (--row)
#   train_step_compile   the same as train_step with --compile (last: it gets what is left)
#
# Quick mode, to check this script on a machine without a GPU (small sizes, a few minutes on
# 2 cores):  SURD_GPU_CHECK_DEVICE=cpu bench/gpu_check.sh   (or: bench/gpu_check.sh --quick)
# There train_step_sdxl still builds SDXL's real 2.6 B-parameter UNet (bf16, ~7 GB resident) but
# runs it at 64 px, batch 1, one call of each step, on all cores (about a minute on an idle
# machine, several on a busy one): the code path, not a speed.
#
# The GPU machine (the device tool's nvidia-h200: Python 3.12, torch 2.11, transformers 5.17,
# accelerate, typer, rich, pyarrow, tensorboard, matplotlib, ...) has no diffusers, and the repo
# is not pip-installed there (this script puts the repo root on PYTHONPATH). Bring diffusers as a
# wheel (importlib_metadata is only its declared requirement: not imported on Python >= 3.8).
# Once, here, in the repo root (the versions in .venv: `.venv/bin/pip show diffusers`):
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
#
# Wheels are taken from $SURD_WHEELS, else bench/wheels/, else .whl/ (the first that holds
# *.whl), installed with `pip install --no-deps --target` into a scratch folder put on
# PYTHONPATH. Then, through the device tool, one call (the script ends within ~8 minutes; the
# machine's start, a minute or two, is not part of timeout_s):
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The table comes back as $OUT/gpu-check.md, with gpu-check.log and the train-step/rewrite JSONs.
#
# Environment: SURD_GPU_CHECK_DEVICE (cuda; cpu = quick mode), SURD_GPU_CHECK_BUDGET (seconds,
# 460), PYTHON (default: .venv/bin/python when there is one, else python3), SURD_WHEELS,
# SURD_GPU_CHECK_KEEP=1 keeps the scratch folder (models, workspaces, runs).
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
START=$SECONDS

DEVICE=${SURD_GPU_CHECK_DEVICE:-cuda}
QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (use --quick)" >&2; exit 2 ;;
    esac
done
if [[ $QUICK == 1 && -z ${SURD_GPU_CHECK_DEVICE:-} ]]; then
    DEVICE=cpu
fi
if [[ $DEVICE == cpu ]]; then
    QUICK=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # small models on a busy CPU: 1 thread is faster
fi
BUDGET=${SURD_GPU_CHECK_BUDGET:-460}
COMPILE_ENV=()
export _TYPER_STANDARD_TRACEBACK=1 # plain tracebacks: their last line is the error
export PYTHONUNBUFFERED=1          # a piece killed at its limit still leaves its output

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

RESULTS=${OUT:-bench-out}
mkdir -p "$RESULTS" || exit 1
TABLE_FILE=$RESULTS/gpu-check.md
LOG_FILE=$RESULTS/gpu-check.log
: >"$LOG_FILE"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/surd-gpu-check.XXXXXX") || exit 1
ROWS=$SCRATCH/rows
WORK=$SCRATCH/work
mkdir -p "$ROWS" "$WORK"
# shellcheck disable=SC2317  # run by the trap below
cleanup() {
    if [[ ${SURD_GPU_CHECK_KEEP:-0} == 1 ]]; then
        echo "scratch kept: $SCRATCH"
    else
        rm -rf "$SCRATCH"
    fi
}
trap cleanup EXIT

TABLE=()
add_row() { # piece status result seconds
    local result=${3//|/\\|}
    TABLE+=("| $1 | $2 | $result | $4 |")
}

# The last line of a log that looks like an error (else its last non-empty line), one line;
# gpu_check.py's own "gpu_check: ..." lines only when nothing above them says more.
last_error() {
    local line own
    own=$(grep -E 'gpu_check: ' "$1" 2>/dev/null | tail -n 1)
    line=$(grep -v 'gpu_check: ' "$1" 2>/dev/null \
        | grep -E '^([A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)\b|error:)' | tail -n 1)
    if [[ -z $line ]]; then
        line=$(grep -v 'gpu_check: ' "$1" 2>/dev/null \
            | grep -E '(Error|error|Exception|FAILED|Killed)' | tail -n 1)
    fi
    if [[ -n $own ]]; then
        own=${own#*gpu_check: }
        line="$own${line:+ <- $line}"
    fi
    if [[ -z $line ]]; then
        line=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1)
    fi
    line=${line:-no output}
    line=${line//$'\r'/}
    line=${line//$'\t'/ }
    echo "${line:0:300}"
}

# run_piece NAME LIMIT_SECONDS COMMAND...: the command writes $ROWS/NAME (STATUS<TAB>RESULT)
run_piece() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        add_row "$name" SKIPPED "the total budget (${BUDGET} s) is spent" 0
        return
    fi
    local log=$SCRATCH/$name.log
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG_FILE"
    local began=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local took=$((SECONDS - began))
    cat "$log" >>"$LOG_FILE"
    local status="" result=""
    if [[ $rc == 0 && -s $ROWS/$name ]]; then
        IFS=$'\t' read -r status result <"$ROWS/$name"
    elif [[ $rc == 124 || $rc == 137 ]]; then
        status=FAILED
        result="timed out after ${limit} s; last: $(last_error "$log")"
    else
        status=FAILED
        result="exit $rc: $(last_error "$log")"
    fi
    echo "--- $name: $status ($took s)" | tee -a "$LOG_FILE"
    add_row "$name" "$status" "$result" "$took"
}

# ----------------------------------------------------------------------------- wheels
WHEELS=""
for folder in "${SURD_WHEELS:-}" bench/wheels .whl; do
    if [[ -n $folder ]] && compgen -G "$folder/*.whl" >/dev/null; then
        WHEELS=$folder
        break
    fi
done
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [[ -n $WHEELS ]]; then
    SITE=$SCRATCH/site
    began=$SECONDS
    log=$SCRATCH/wheels.log
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl >"$log" 2>&1; then
        export PYTHONPATH=$REPO:$SITE${PYTHONPATH#"$REPO"}
        export SURD_GPU_CHECK_SITE=$SITE
        names=""
        for wheel in "$WHEELS"/*.whl; do
            wheel=${wheel##*/}
            names+="${wheel%%-*} "
        done
        add_row wheels OK "installed from $WHEELS: ${names% }" $((SECONDS - began))
    else
        add_row wheels FAILED "pip install: $(last_error "$log")" $((SECONDS - began))
    fi
    cat "$log" >>"$LOG_FILE"
fi

# ----------------------------------------------------------------------------- pieces
if [[ $QUICK == 1 ]]; then
    STEP_ARGS=(--size small --batch-size 8 --rounds 1 --steps 2 --warmup 1)
    STAGE_ARGS=(--items 48 --warmup 8 --batch 16 --new-tokens 8)
    SDXL_ARGS=(--size sdxl --dtype bfloat16 --batch-size 1 --resolution 64 --rounds 1 --steps 1
        --warmup 0)
    # 2.6 B parameters: not a small model (nproc itself follows OMP_NUM_THREADS, set above)
    SDXL_ENV=(env "OMP_NUM_THREADS=$(env -u OMP_NUM_THREADS nproc)")
    VLM_ARGS=(--vlm-images 16 --vlm-single 4 --vlm-batch-sizes 8 --new-tokens 8)
    CAPS=(env=60 train_step=150 train_e2e=240 screen=90 rewrite=90 rewrite_vlm=90
        train_step_sdxl=300 train_step_compile=240)
    BUDGET=${SURD_GPU_CHECK_BUDGET:-1200}
    # inductor's C++ build of the UNet takes ~3 min on 2 cores: trace with dynamo and AOT
    # autograd but skip the code generation (SURD_GPU_CHECK_INDUCTOR=1 keeps inductor)
    if [[ ${SURD_GPU_CHECK_INDUCTOR:-0} != 1 ]]; then
        COMPILE_ENV=(env "TORCH_COMPILE_OVERRIDE_BACKENDS=>=0:aot_eager")
    fi
else
    STEP_ARGS=(--size sd15 --batch-size 32 --rounds 3 --steps 8 --warmup 3)
    STAGE_ARGS=(--items 2048 --warmup 64 --batch 256 --new-tokens 16)
    SDXL_ARGS=(--size sdxl --dtype bfloat16 --batch-size 8 --rounds 3 --steps 4 --warmup 2)
    SDXL_ENV=()
    VLM_ARGS=(--vlm-images 128 --vlm-single 16 --vlm-batch-sizes 8 32 --new-tokens 16)
    CAPS=(env=30 train_step=90 train_e2e=90 screen=45 rewrite=45 rewrite_vlm=60
        train_step_sdxl=90 train_step_compile=260)
fi
cap() { # the limit of piece $1 in CAPS
    local entry
    for entry in "${CAPS[@]}"; do
        [[ ${entry%%=*} == "$1" ]] && echo "${entry#*=}" && return
    done
    echo 60
}
STAGE=("$PY" bench/gpu_check.py --work "$WORK" --device "$DEVICE")

echo "gpu check: device $DEVICE, quick $QUICK, budget ${BUDGET} s, python $PY, results $RESULTS"
run_piece env "$(cap env)" "${STAGE[@]}" env --row "$ROWS/env"
run_piece train_step "$(cap train_step)" "${STAGE[@]}" train-step --row "$ROWS/train_step" \
    --json "$RESULTS/train-step.json" -- "${STEP_ARGS[@]}"
run_piece train_e2e "$(cap train_e2e)" "${STAGE[@]}" train --row "$ROWS/train_e2e"
run_piece screen "$(cap screen)" "${STAGE[@]}" screen --row "$ROWS/screen" "${STAGE_ARGS[@]}"
run_piece rewrite "$(cap rewrite)" "${STAGE[@]}" rewrite --row "$ROWS/rewrite" "${STAGE_ARGS[@]}"
# bench/rewrite.py's vlm part alone (its other parts need no GPU); it writes the row itself
run_piece rewrite_vlm "$(cap rewrite_vlm)" "$PY" bench/rewrite.py --device "$DEVICE" \
    --skip hf openai rules openai-image --json "$RESULTS/rewrite-vlm.json" \
    --row "$ROWS/rewrite_vlm" "${VLM_ARGS[@]}"
# not through gpu_check.py's train-step (its row has a (c) column): train_step.py writes the row
run_piece train_step_sdxl "$(cap train_step_sdxl)" "${SDXL_ENV[@]}" "$PY" bench/train_step.py \
    --device "$DEVICE" --json "$RESULTS/train-step-sdxl.json" --row "$ROWS/train_step_sdxl" \
    "${SDXL_ARGS[@]}"
run_piece train_step_compile "$(cap train_step_compile)" "${COMPILE_ENV[@]}" "${STAGE[@]}" \
    train-step --row "$ROWS/train_step_compile" --json "$RESULTS/train-step-compile.json" \
    -- "${STEP_ARGS[@]}" --compile

# ----------------------------------------------------------------------------- table
{
    echo "### surd GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE$([[ $QUICK == 1 ]] && echo ' (quick mode)'), $((SECONDS - START)) s"
    echo
    echo "| piece | status | result | s |"
    echo "|---|---|---|---|"
    printf '%s\n' "${TABLE[@]}"
} >"$TABLE_FILE"
echo
cat "$TABLE_FILE"
echo
echo "table: $TABLE_FILE, logs: $LOG_FILE"
# exit status: 1 when a piece FAILED (the table is printed either way)
for row in "${TABLE[@]}"; do
    [[ $row == *"| FAILED |"* ]] && exit 1
done
exit 0
