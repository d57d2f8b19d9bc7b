#!/usr/bin/env bash
# Every GPU number in one call on a lent GPU (bench/README.md has the device
# command), in stages ordered by value, each time-boxed:
#   a  the kernel on CUDA: the compiled kernel against the reference bit for
#      bit, CUDA graph replay, no host sync, > 2^31 elements, v = 0 rows
#   b  bandwidth sweep of every kernel variant
#   c  headline step times: ours, torch AdamW fused/foreach, torch-adopt foreach
#   d  host overhead of step()
#   e  BLOCK_SIZE x num_warps sweep
#   f  while time remains: f1 every other kernel_device test compiled, f2 the
#      remaining peers, f3 the rest of the test suite
#
#   bash bench/run_gpu.sh              # CUDA machine; ends within ADOPT_GPU_BUDGET_S (480 s)
#   bash bench/run_gpu.sh --rehearse   # the same stages on the CPU: interpreter, tiny sizes (< 5 min)
#   ADOPT_GPU_STAGES=f1,f2 bash bench/run_gpu.sh   # only these stages (a second call)
#   ADOPT_GPU_STAGE_CAP_S=30 ...                    # no stage longer than 30 s
#
# It runs whichever python3 is first on PATH. The project is installed as on
# the lent image: non-editable, into a target directory (with the wheels in
# .whl/, if any), and Python never runs with the repository root on sys.path
# (python3 -P, or scripts in bench/), so the source tree's adopt_triton/ (which
# has no kernels/) cannot shadow the installed package; a check says so first.
#
# $OUT (default /tmp/adopt-gpu-out) holds, after every stage, the results JSON,
# summary.txt and logs.tar.gz (each stage's log, junit XML, benchmark JSON,
# device info); at the end the rendered table (.md) and plots (.png): 6 files,
# never more than 8. A stage cut by its time box is interrupted with SIGINT, so pytest
# and the bench scripts still write what they measured (every row is merged
# into the JSON as soon as it is measured).
# Exit status 0 when every stage that ran passed, 1 when one failed or was cut
# (or, rehearsing, did not run for lack of time); 2 when nothing could run.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
REHEARSE=0
[[ ${1:-} == --rehearse ]] && REHEARSE=1
[[ $# -gt REHEARSE ]] && { echo "usage: bash bench/run_gpu.sh [--rehearse]" >&2; exit 2; }

if (( REHEARSE )); then
    BUDGET=${ADOPT_GPU_BUDGET_S:-290} RESERVE=15 MIN_STAGE=5
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    # RESERVE: a cut stage's 20 s to exit, then the table and plots.
    BUDGET=${ADOPT_GPU_BUDGET_S:-480} RESERVE=40 MIN_STAGE=20
    export TRITON_INTERPRET=0
fi
DEADLINE=$(( SECONDS + BUDGET ))
OUT=${OUT:-/tmp/adopt-gpu-out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/adopt-gpu.XXXXXX")
SITE=$WORK/site LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS" "$WORK/results"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export ADOPT_BENCH_RESULTS=$WORK/results ADOPT_BENCH_DATE=$(date +%F)
export ADOPT_BENCH_COMMAND="bash bench/run_gpu.sh${1:+ $1}"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
FAILED="" SUMMARY=$LOGS/summary.txt
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

sync_out() {  # the results JSON, the summary and the logs into $OUT, each replaced in one step
    local json
    for json in "$WORK"/results/*.json; do
        [[ -e $json ]] && cp "$json" "$OUT/.$(basename "$json")" && mv "$OUT/.$(basename "$json")" "$OUT/$(basename "$json")"
    done
    cp "$SUMMARY" "$OUT/.summary.txt" && mv "$OUT/.summary.txt" "$OUT/summary.txt"
    tar -czf "$OUT/.logs.tar.gz" -C "$WORK" logs && mv "$OUT/.logs.tar.gz" "$OUT/logs.tar.gz"
}

wanted() { [[ -z ${ADOPT_GPU_STAGES:-} || ,$ADOPT_GPU_STAGES, == *,$1,* ]]; }

stage() {  # stage NAME CAP_SECONDS DESCRIPTION COMMAND...: run COMMAND within min(CAP, time left)
    local name=$1 cap=$2 what=$3
    shift 3
    wanted "$name" || return 0
    local left=$(( DEADLINE - SECONDS - RESERVE ))
    (( cap > ${ADOPT_GPU_STAGE_CAP_S:-cap} )) && cap=$ADOPT_GPU_STAGE_CAP_S
    local limit=$(( cap < left ? cap : left ))
    if (( limit < MIN_STAGE )); then
        say "stage $name ($what): not run, ${left} s left"
        (( REHEARSE )) && FAILED="$FAILED $name"
        sync_out
        return 0
    fi
    echo "== stage $name: $what (time box ${limit} s)"
    local start=$SECONDS
    timeout -s INT -k 20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? status
    case $rc in
        0) status=ok ;;
        124|137) status="CUT by its ${limit} s time box"; FAILED="$FAILED $name" ;;
        *) status="FAILED (exit $rc)"; FAILED="$FAILED $name" ;;
    esac
    tail -n 12 "$LOGS/$name.log"
    say "stage $name ($what): $status, $(( SECONDS - start )) s"
    sync_out
}

# --- set-up: install as on the image, check nothing shadows it, describe the machine
{
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "python3 -P needs Python 3.11"' &&
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . &&
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl
    fi &&
    python3 -P -c 'import sys, adopt_triton.kernels.adopt as k, adopt_triton as a
for m in (a, k):
    assert m.__file__.startswith(sys.argv[1]), f"{m.__name__} from {m.__file__}, not from {sys.argv[1]}"
print("adopt_triton installed in", sys.argv[1])' "$SITE"
} > "$LOGS/setup.log" 2>&1
SETUP=$?
{
    echo "command: $ADOPT_BENCH_COMMAND (rehearse=$REHEARSE, budget ${BUDGET} s), $(date -Is), $(hostname)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -P -c 'import sys, torch, triton; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "triton", triton.__version__)'
    echo "cpus $(nproc)"
} > "$LOGS/device.txt" 2>&1
cat "$LOGS/setup.log" "$LOGS/device.txt"
if (( SETUP != 0 )); then
    say "set-up FAILED: nothing can run (see setup.log)"
    sync_out
    exit 2
fi
if (( ! REHEARSE )) && ! python3 -P -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    say "no CUDA device: run 'bash bench/run_gpu.sh --rehearse' on a machine without one"
    sync_out
    exit 2
fi

PYTEST=(python3 -P -m pytest -p no:cacheprovider -q -rfEs)
# tests/ on the path for its plugin: interpreter_fma_plugin gives Triton 3.6's
# interpreter (the image's) a true fma, as 3.7+ has (f3 interprets; a no-op on
# newer Triton). tests/conftest.py marks the kernel_device fixture's users `kernel`.
TESTS=(env "PYTHONPATH=$REPO/tests:$PYTHONPATH" "${PYTEST[@]}" -p interpreter_fma_plugin)
KERNEL_TESTS=("${TESTS[@]}" -m "kernel or cuda")
if (( ! REHEARSE )) && python3 -c 'import xdist' 2> /dev/null; then
    KERNEL_TESTS+=(-n 8)  # compiles kernel variants in parallel
fi
if (( REHEARSE )); then
    BENCH=("${PYTEST[@]}" bench --benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-warmup=off)
    COLLECT_ONLY=(--collect-only)  # f1 and f3 only collect when rehearsing: CI runs those tests itself
    HOST_OVERHEAD_ARGS=(--repeats 10)
else
    BENCH=("${PYTEST[@]}" bench --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.5)
    COLLECT_ONLY=() HOST_OVERHEAD_ARGS=()
fi
A_FILES=(tests/test_cuda.py tests/test_kernel.py tests/test_capturable.py)

stage a 150 "the kernel on CUDA, compiled, bit-exact against the reference" \
    "${KERNEL_TESTS[@]}" --junitxml="$LOGS/a.xml" "${A_FILES[@]}"
stage b 60 "bandwidth of every kernel variant" \
    python3 bench/bandwidth.py
stage c 120 "headline step times" \
    env ADOPT_BENCH_SELECT=headline "${BENCH[@]}" --benchmark-json="$LOGS/c.json"
if [[ -f bench/host_overhead.py ]]; then
    stage d 40 "host overhead of step()" python3 bench/host_overhead.py "${HOST_OVERHEAD_ARGS[@]}"
elif wanted d; then
    say "stage d (host overhead of step()): skipped, bench/host_overhead.py is not in this tree yet"
fi
stage e 60 "BLOCK_SIZE x num_warps sweep" \
    python3 bench/bandwidth.py --block-sweep
stage f1 150 "every other kernel test, compiled" \
    "${KERNEL_TESTS[@]}" "${COLLECT_ONLY[@]}" --junitxml="$LOGS/f1.xml" tests "${A_FILES[@]/#/--ignore=}"
stage f2 600 "the remaining peers' step times" \
    env ADOPT_BENCH_SELECT=rest "${BENCH[@]}" --benchmark-json="$LOGS/f2.json"
stage f3 600 "the rest of the test suite (interpreted, CPU)" \
    env TRITON_INTERPRET=1 "${TESTS[@]}" "${COLLECT_ONLY[@]}" --junitxml="$LOGS/f3.xml" \
    -m "not kernel and not cuda" tests --ignore=tests/test_gpu_script.py --ignore=tests/test_bench_smoke.py

# --- the table and plots, from whatever was measured
for json in "$WORK"/results/*.json; do
    [[ -e $json ]] || continue
    timeout 30 python3 bench/render.py "$json" > "$LOGS/render.log" 2>&1 \
        || { say "render FAILED (see render.log)"; FAILED="$FAILED render"; }
    cp "${json%.json}.md" "${json%.json}.png" "$OUT"/ 2> /dev/null
    if (( ! REHEARSE )); then
        cp "$json" "${json%.json}.md" "${json%.json}.png" bench/results/ 2> /dev/null
    fi
done
cp "$WORK"/results/*.png "$OUT"/ 2> /dev/null
cp "$WORK"/results/*.csv "$WORK"/results/*.html "$LOGS"/ 2> /dev/null
say "total $SECONDS s of a ${BUDGET} s budget; failed or cut:${FAILED:- none}"
sync_out
echo "== $OUT:"
ls -l "$OUT"
rm -rf "$WORK"
[[ -z $FAILED ]]
