#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md): environment, CUDA tests, norm-kernel bandwidth, training
# throughput against timm, profiler tables. Every step runs under its own time limit inside one overall budget,
# writes its JSON lines under $OUT as it goes, and is recorded in $OUT/steps.jsonl; a failing step is recorded and
# the next one runs.
#
#   bash bench/gpu_check.sh [--dry-run] [OUT=DIR] [PY=PYTHON] [STEPS=a,b] [BUDGET_S=N] [BATCH=N]
#                           [RESOLUTIONS=160,224] [MODELS=p1,p2] [LIMIT_<STEP>=N]
#   make gpu-check [OUT=DIR] [GPU_CHECK_ARGS="--dry-run STEPS=env,tests"]
#
# OUT and PY are also read from the environment (GPU_CHECK_<NAME> for the others); OUT defaults to
# runs/gpu-check-<time>, PY to .venv/bin/python. STEPS picks steps by name or group (env, tests, kernels,
# throughput, profile). --dry-run: the same steps on the CPU with tiny shapes and batch (what `make test` runs).
# Test hooks: GPU_CHECK_FAIL=<step,...> makes those steps fail, GPU_CHECK_HANG=<step,...> makes them hang until
# their time limit.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

DRY_RUN=0
OUT="${OUT:-}"
PY="${PY:-}"
STEPS="${GPU_CHECK_STEPS:-env,tests,kernels,throughput,profile}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"   # the whole check; an H100 call must stay well inside 8 minutes
BATCH="${GPU_CHECK_BATCH:-}"
RESOLUTIONS="${GPU_CHECK_RESOLUTIONS:-}"
MODELS="${GPU_CHECK_MODELS:-}"
# seconds: each step's own limit, and what it keeps back for the steps after it when the budget runs short
declare -A LIMIT=([env]=30 [tests]=150 [kernels]=75 [throughput-triton]=90 [throughput-torch]=600 [profile]=75)
declare -A FLOOR=([env]=10 [tests]=30 [kernels]=20 [throughput-triton]=30 [throughput-torch]=60 [profile]=45)
ORDER=(env tests kernels throughput-triton throughput-torch profile)

for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        OUT=*|PY=*|STEPS=*|BUDGET_S=*|BATCH=*|RESOLUTIONS=*|MODELS=*) printf -v "${arg%%=*}" '%s' "${arg#*=}" ;;
        LIMIT_*=*)
            key="${arg%%=*}"; key="${key#LIMIT_}"; key="${key,,}"; key="${key//_/-}"
            if [[ -z "${LIMIT[$key]+set}" ]]; then
                echo "gpu_check.sh: no step '$key' (steps: ${ORDER[*]})" >&2; exit 2
            fi
            LIMIT[$key]="${arg#*=}" ;;
        *) echo "gpu_check.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
for step in "${ORDER[@]}"; do  # GPU_CHECK_LIMIT_<STEP> from the environment, e.g. GPU_CHECK_LIMIT_TESTS=60
    var="GPU_CHECK_LIMIT_${step//-/_}"; var="${var^^}"
    if [[ -n "${!var:-}" ]]; then LIMIT[$step]="${!var}"; fi
done

for pair in "BUDGET_S=$BUDGET_S" "BATCH=${BATCH:-1}" $(for s in "${ORDER[@]}"; do n="${s//-/_}"; echo "LIMIT_${n^^}=${LIMIT[$s]}"; done); do
    if [[ ! "${pair#*=}" =~ ^[0-9]+$ ]]; then
        echo "gpu_check.sh: ${pair%%=*} must be a whole number, not '${pair#*=}'" >&2; exit 2
    fi
done

# OUT and PY are taken relative to where the script is called from; everything then runs in the repository root.
if [[ -z "$PY" ]]; then PY="$ROOT/.venv/bin/python"; fi
if [[ "$PY" == */* && "$PY" != /* ]]; then PY="$PWD/$PY"; fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python at '$PY' (run 'make venv', or pass PY=/path/to/venv/bin/python)" >&2
    exit 2
fi
if [[ -z "$OUT" ]]; then OUT="$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)"; fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
if [[ -e "$OUT/steps.jsonl" ]]; then
    echo "gpu_check.sh: $OUT already holds a run (steps.jsonl); give a new OUT" >&2
    exit 2
fi
RECORD="$OUT/steps.jsonl"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if (( DRY_RUN )); then
    # GN rather than LN+PN: the same code paths (modules and norm Function) with fewer ops to run and profile on a CPU
    DEVICE=cpu; BATCH="${BATCH:-2}"; RESOLUTIONS="${RESOLUTIONS:-32}"; MODELS="${MODELS:-efficientnet-b0-g16-gn}"
    SHAPES=('2,8,6,6'); KITERS=1; KWARMUP=0; TSTEPS=1; TWARMUP=1; TREPEATS=1; PWARMUP=1
    THREADS=(--threads 1)
    KERNEL_ENV=(TRITON_INTERPRET=1 EFFNET_BENCH_CPU_SMOKE=1)  # bench.kernels' CPU hook: Triton's interpreter
    # Inductor on a CPU takes minutes per model: the dry run runs torch.compile's code path with dynamo disabled.
    export TORCHDYNAMO_DISABLE=1
else
    DEVICE=cuda; BATCH="${BATCH:-256}"; RESOLUTIONS="${RESOLUTIONS:-160,224}"
    MODELS="${MODELS:-efficientnet-b0-g16-ln-pn,efficientnet-b0-g16-gn,efficientnet-b0-g1-bn}"
    SHAPES=('256,96,80,80' '256,480,20,20'); KITERS=20; KWARMUP=5; TSTEPS=10; TWARMUP=5; TREPEATS=2; PWARMUP=5
    THREADS=()
    KERNEL_ENV=()
fi

# ------------------------------------------------------------------------------------------------------ helpers
usec() { local t="${EPOCHREALTIME:-}"; if [[ -n "$t" ]]; then echo "${t//[!0-9]/}"; else date +%s%6N; fi; }
START_US="$(usec)"
DEADLINE=$(( $(date +%s) + BUDGET_S ))

json_str() {  # $1 as a JSON string literal
    local s="$1"
    s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\t'/\\t}"; s="${s//$'\r'/\\r}"
    printf '"%s"' "$s"
}
json_or_null() { if [[ -n "$1" ]]; then printf '%s' "$1"; else printf 'null'; fi; }
secs() { printf '%d.%01d' $(( $1 / 1000000 )) $(( $1 % 1000000 / 100000 )); }  # microseconds -> "12.3"

in_list() {  # in_list ITEM a,b,c
    local IFS=,
    local x
    for x in $2; do [[ "$x" == "$1" ]] && return 0; done
    return 1
}
selected() { in_list "$1" "$STEPS" || in_list "${1%%-*}" "$STEPS"; }

# record STEP STATUS RC SECONDS LIMIT REASON COMMAND
record() {
    printf '{"what": "step", "step": %s, "status": %s, "rc": %s, "seconds": %s, "limit_s": %s, "reason": %s, "command": %s, "time": %s}\n' \
        "$(json_str "$1")" "$(json_str "$2")" "$(json_or_null "$3")" "$(json_or_null "$4")" "$(json_or_null "$5")" \
        "$( [[ -n "$6" ]] && json_str "$6" || printf null)" "$(json_str "$7")" \
        "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" >> "$RECORD"
}

declare -A STATUS=()
declare -A TOOK=()

# run_step STEP STDOUT_FILE COMMAND...: the command under `timeout`, stdout appended to STDOUT_FILE, stderr to
# $OUT/STEP.log; its limit is its own, cut to what the budget has left after keeping FLOOR for each later step.
run_step() {
    local step="$1" stdout="$2"; shift 2
    selected "$step" || return 0
    local later=0 seen=0 s
    for s in "${ORDER[@]}"; do
        if (( seen )) && selected "$s"; then later=$(( later + FLOOR[$s] )); fi
        [[ "$s" == "$step" ]] && seen=1
    done
    local left=$(( DEADLINE - $(date +%s) ))
    local limit="${LIMIT[$step]}"
    local command="$*"
    if (( left - later < limit )); then limit=$(( left - later )); fi
    if (( limit < LIMIT[$step] && limit < 5 )); then  # what the budget leaves is too little to start
        STATUS[$step]=skipped
        record "$step" skipped "" "" "" "budget: ${left} s left of BUDGET_S=${BUDGET_S}, ${later} s kept for later steps" "$command"
        printf '==> %-20s skipped (budget)\n' "$step"
        return 0
    fi
    if in_list "$step" "${GPU_CHECK_FAIL:-}"; then
        set -- bash -c 'echo "gpu_check: injected failure (GPU_CHECK_FAIL)" >&2; exit 3'
    elif in_list "$step" "${GPU_CHECK_HANG:-}"; then
        set -- sleep 3600
    fi
    printf '==> %-20s limit %4d s: %s\n' "$step" "$limit" "$command"
    record "$step" started "" "" "$limit" "" "$command"
    local t0 rc status
    t0="$(usec)"
    timeout --kill-after=10 "$limit" "$@" >> "$stdout" 2>> "$OUT/$step.log"
    rc=$?
    local took; took="$(secs $(( $(usec) - t0 )))"
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    STATUS[$step]="$status"; TOOK[$step]="$took"
    record "$step" "$status" "$rc" "$took" "$limit" "" "$command"
    printf '    %-20s %s in %s s (rc %d)\n' "$step" "$status" "$took" "$rc"
    if [[ "$status" != ok ]]; then tail -n 5 "$OUT/$step.log" | sed 's/^/    | /'; fi
}

skip_step() {  # skip_step STEP REASON
    selected "$1" || return 0
    STATUS[$1]=skipped
    record "$1" skipped "" "" "" "$2" ""
    printf '==> %-20s skipped: %s\n' "$1" "$2"
}

printf '{"what": "run", "dry_run": %s, "out": %s, "py": %s, "steps": %s, "budget_s": %s, "batch_size": %s, "resolutions": %s, "models": %s, "time": %s}\n' \
    "$( (( DRY_RUN )) && echo true || echo false)" "$(json_str "$OUT")" "$(json_str "$PY")" "$(json_str "$STEPS")" \
    "$BUDGET_S" "$BATCH" "$(json_str "$RESOLUTIONS")" "$(json_str "$MODELS")" \
    "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" >> "$RECORD"
echo "gpu_check: $( (( DRY_RUN )) && echo 'dry run (CPU)' || echo 'CUDA') -> $OUT (budget ${BUDGET_S} s)"

# ------------------------------------------------------------------------------------------------------ 1. env
run_step env "$OUT/env.jsonl" "$PY" -m bench.gpu_check env
if (( ! DRY_RUN )) && [[ "${STATUS[env]:-}" == ok ]] && ! grep -q '"cuda_available": true' "$OUT/env.jsonl"; then
    echo "gpu_check: torch sees no CUDA device here; nothing to measure (--dry-run checks the script on a CPU)" >&2
    record check stopped "" "" "" "torch.cuda.is_available() is False; run with --dry-run on a CPU" ""
    exit 2
fi

# ---------------------------------------------------------------------------------------- 2. the CUDA tests
mapfile -t CUDA_TEST_FILES < <(grep -lzE 'mark\.cuda|skipif\([^)]*cuda\.is_available' tests/test_*.py)
run_step tests "$OUT/tests.log" env EFFNET_TESTS_JSONL="$OUT/tests.jsonl" \
    "$PY" -m pytest -p bench.pytest_jsonl -p no:cacheprovider -m cuda -v "${CUDA_TEST_FILES[@]}"

# ------------------------------------------------------------------- 3. fused norm kernels against a plain copy
KARGS=(--dtype bf16 --iters "$KITERS" --warmup "$KWARMUP" --layout 'nhwc,nchw')
for shape in "${SHAPES[@]}"; do KARGS+=(--shape "$shape"); done
run_step kernels "$OUT/kernels.jsonl" env "${KERNEL_ENV[@]}" "$PY" -m bench.kernels "${KARGS[@]}"

# ---------------------------------------------------------------------- 4. training throughput against timm
# Two processes: the Triton kernels alone first (never run on a GPU before: a crash or a hang there cannot take
# the PyTorch parts with it), then the PyTorch parts -- eager (modules and norm Function) and every compiled part
# in priority order -- which take what the budget has left after keeping the profile step's share.
TARGS=(--device "$DEVICE" --precision bf16 --channels-last --batch-size "$BATCH" --steps "$TSTEPS"
       --warmup "$TWARMUP" --repeats "$TREPEATS" --models "$MODELS" --resolutions "$RESOLUTIONS"
       --record "$RECORD" "${THREADS[@]}")
if (( DRY_RUN )); then
    skip_step throughput-triton "dry run: a whole model on the Triton kernels takes ~35 s a step in Triton's CPU interpreter; the kernels step runs them there instead"
else
    run_step throughput-triton "$OUT/throughput.jsonl" \
        "$PY" -m bench.gpu_check throughput --step throughput-triton --parts triton "${TARGS[@]}"
fi
run_step throughput-torch "$OUT/throughput.jsonl" \
    "$PY" -m bench.gpu_check throughput --step throughput-torch --parts eager,compile-all "${TARGS[@]}"

# --------------------------------------------------------------------------- 5. profiler tables of one step
run_step profile "$OUT/profile.jsonl" \
    "$PY" -m bench.gpu_check profile --model "${MODELS%%,*}" --device "$DEVICE" --precision bf16 --channels-last \
    --batch-size "$BATCH" --resolution "${RESOLUTIONS%%,*}" --warmup "$PWARMUP" \
    --fastest-from "$OUT/throughput.jsonl" --table-dir "$OUT" "${THREADS[@]}"

# ------------------------------------------------------------------------------------------------- summary
TOTAL="$(secs $(( $(usec) - START_US )))"
echo "gpu_check: done in ${TOTAL} s -> $OUT"
summary=""
failed=""
for step in "${ORDER[@]}"; do
    [[ -n "${STATUS[$step]:-}" ]] || continue
    printf '    %-20s %-8s %8s s\n' "$step" "${STATUS[$step]}" "${TOOK[$step]:--}"
    summary+="${summary:+, }$(json_str "$step"): $(json_str "${STATUS[$step]}")"
    case "${STATUS[$step]}" in ok|skipped) ;; *) failed+="${failed:+, }$(json_str "$step")" ;; esac
done
printf '{"what": "summary", "steps": {%s}, "failed": [%s], "seconds": %s, "dry_run": %s, "time": %s}\n' \
    "$summary" "$failed" "$TOTAL" "$( (( DRY_RUN )) && echo true || echo false)" \
    "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" >> "$RECORD"
[[ -z "$failed" ]]
