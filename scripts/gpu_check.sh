#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2054,SC2089,SC2090,SC2317  # code in strings, comma lists, bash -c
# All GPU checks of the project in one call, for a CUDA machine such as the device machine (one
# H200, no network): (a) environment, (b) set-up, (c) JIT build of the WKV6 CUDA kernel, (d) the
# gpu-marked tests, (p) the kernel's self-check figures, packed documents (doc_start) against each
# document alone, and chunked vs plain cross-entropy peak memory (V = 65536, 4096 tokens per
# micro-batch), (m) the memory plan (bench/memory_plan.py) beside a 1.6B ZeRO-2 train.py run's
# torch.cuda.max_memory_allocated, (e) WKV kernel vs chunked benchmark, (f) Bone vs LoRA
# training-step benchmark (the paper's Table 6), (g) $OUT/summary.md.
#
#   bash scripts/gpu_check.sh                                   # results in $OUT (default gpu_out/)
#   OUT=/tmp/gc GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh  # no GPU: CPU dry run, tiny sizes
#
# Files written to $OUT (8; the device tool brings back at most 8): env.txt, build.txt,
# pytest_gpu.txt, paths.txt (steps p and m), bench_wkv.txt, train_step.txt, train_step.json, summary.md.
# Every step has a timeout, clamped to what is left of GPU_CHECK_BUDGET_S (default 540 s, so the
# whole script ends inside a 10-minute call), and the script goes on after a failing step.
# Exit status: 0 every step that ran passed; 1 a step failed or timed out; 3 no CUDA and no dry
# run asked for (the GPU steps were skipped).
#
# Python: $PY if set; else .venv/bin/python or python3, the first whose torch sees CUDA (the
# device image's python3 holds torch with CUDA, pytest, ninja and Lightning); the repository is
# used in place through PYTHONPATH, so nothing is installed there. Only when no python with torch
# exists is .venv created and `pip install -e .[dev]` tried (that needs a package index).
# Knobs: TRAIN_STEP_METHODS (bone,lora), TRAIN_STEP_GRAD_CP (1,0: checkpointed runs first, so a
# timeout still leaves them in train_step.json, which is rewritten after every run).
set -uo pipefail

OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
BUDGET=${GPU_CHECK_BUDGET_S:-540}
TRAIN_STEP_METHODS=${TRAIN_STEP_METHODS:-bone,lora}
TRAIN_STEP_GRAD_CP=${TRAIN_STEP_GRAD_CP:-1,0}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- python --------------------------------------------------------------------------------
py_ok() {  # py_ok PYTHON [cuda]: it imports torch (and torch sees a GPU)
    local check='import torch'
    [ "${2:-}" = cuda ] && check='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
    command -v "$1" >/dev/null 2>&1 && "$1" -c "$check" >/dev/null 2>&1
}
pick_python() {
    local p
    for p in .venv/bin/python python3 python; do py_ok "$p" cuda && { echo "$p"; return; }; done
    for p in .venv/bin/python python3 python; do py_ok "$p" && { echo "$p"; return; }; done
}
PY=${PY:-$(pick_python)}

# ---- steps ---------------------------------------------------------------------------------
declare -A TITLE=([a]="environment" [b]="set-up" [c]="build the WKV6 CUDA kernel"
                  [d]="gpu-marked tests" [p]="self-check, packed, chunked-CE paths"
                  [m]="memory plan vs measured" [e]="WKV6 benchmark" [f]="training-step benchmark")
declare -A STATUS SECS LOG
STEPS=(a b c d p m e f)
FAILED=0

record() {  # record KEY STATUS SECONDS LOGFILE
    STATUS[$1]=$2; SECS[$1]=$3; LOG[$1]=$(basename "$4")
    case $2 in ok | skipped*) ;; *) FAILED=1 ;; esac
    echo "=== [$1] ${TITLE[$1]}: $2 (${3}s)"
}

run_step() {  # run_step KEY LOGFILE CAP_SECONDS COMMAND...: output to LOGFILE and the console
    local key=$1 log=$2 cap=$3; shift 3
    local left=$((BUDGET - SECONDS - 20))  # keep time for the summary
    local t=$((cap < left ? cap : left))
    if ((t < 10)); then
        record "$key" "skipped: time budget of ${BUDGET}s spent" 0 "$log"
        return
    fi
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    echo "=== [$key] ${TITLE[$key]} (timeout ${t}s): ${cmd:0:160}" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=15 "$t" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]} status
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${t}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    record "$key" "$status" $((SECONDS - start)) "$log"
}

skip_step() { record "$1" "skipped: $2" 0 "${3:--}"; }

ENV_PY='
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
except ImportError as exc:
    raise SystemExit(f"torch is not importable: {exc}")
print("torch", torch.__version__, "| CUDA runtime", torch.version.cuda, "| cuda available",
      torch.cuda.is_available(), "| CPU threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} | capability {p.major}.{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.1f} GiB")
from torch.utils import cpp_extension
print("CUDA_HOME", cpp_extension.CUDA_HOME)
from importlib import metadata
for name in ("numpy", "pytest", "pytest-timeout", "pytorch-lightning", "ninja", "deepspeed", "rwkv"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} not installed")
'
env_report() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "repo $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'), python: ${PY:-none}"
    uname -a
    echo "CPUs $(nproc), $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB memory"}')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
    [ -n "$PY" ] && "$PY" -c "$ENV_PY"
}

SETUP_PY='
import shutil
import numpy, pytest, torch  # noqa: F401
import rwkv_bone.model, rwkv_bone.peft, rwkv_bone.wkv.cuda  # noqa: F401
import rwkv_bone.train.module  # noqa: F401  (pytorch_lightning; the train-step bench needs it)
ninja = shutil.which("ninja")
print("imports ok; ninja:", ninja or "NOT FOUND (the kernel JIT build needs it)")
raise SystemExit(0 if ninja else 1)
'

BUILD_PY='
import time
import torch
from rwkv_bone.wkv import cuda as wkv_cuda
t = time.perf_counter()
ext = wkv_cuda.load_extension()
print(f"kernel build+load: {time.perf_counter() - t:.1f} s ({ext.__file__})")
print("arch list:", torch.cuda.get_arch_list(), "| device capability", torch.cuda.get_device_capability())
'

add_python_bin_to_path() {  # ninja (torch's JIT build runs it) may sit beside the interpreter only
    [ -n "$PY" ] || return 0
    local pybin ninjabin
    pybin=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
    ninjabin=$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)
    export PATH="${ninjabin:+$ninjabin:}${pybin:+$pybin:}$PATH"
}

# ---- (a) environment, (b) set-up -----------------------------------------------------------
add_python_bin_to_path
export PY ENV_PY
export -f env_report
run_step a "$OUT/env.txt" 30 bash -c env_report
if [ -z "$PY" ]; then
    # A .venv has to be made here, in this shell, so that PY is set for the later steps.
    run_step b "$OUT/env.txt" 300 bash -c \
        'python3 -m venv .venv && .venv/bin/python -m pip install -q -e ".[dev]" && .venv/bin/python -c "$0"' \
        "$SETUP_PY"
    [ -x .venv/bin/python ] && PY=.venv/bin/python && add_python_bin_to_path
else
    run_step b "$OUT/env.txt" 60 "$PY" -c "$SETUP_PY"
fi

MODE=none
if [ -n "$PY" ] && py_ok "$PY" cuda; then
    MODE=gpu
elif [ -n "$PY" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    MODE=cpu
fi
echo "=== mode: $MODE (python: ${PY:-none})" | tee -a "$OUT/env.txt"

# (m): 3 train.py steps of Bone b=64, micro_bsz 8, ctx 512, grad_cp 1 (on a GPU: L24 C2048 = 1.6B,
# random weights in the official layout, bf16, ZeRO-2 on one GPU; CPU dry run: L2 C128 fp32, the plumbing only), then the
# plan for the 1.6B setting with that run's peak (metrics.csv's peak_mem_mb) beside it.
MEMPLAN_SH='
py=$0; mode=$1; t=$(mktemp -d); trap "rm -rf $t" EXIT
"$py" make_data.py data/demo/pretrain.txt --output "$t/d" --quiet || exit 1
if [ "$mode" = gpu ]; then
    size=(24 2048); dev=(--accelerator gpu --precision bf16 --strategy deepspeed_stage_2)
else
    size=(2 128); dev=(--accelerator cpu --precision fp32)
fi
"$py" -c "import sys; sys.path.insert(0, \"bench\"); from bench_merge import make_checkpoint; \
make_checkpoint(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 65536)" "$t/base.pth" "${size[@]}" || exit 1
"$py" train.py --load_model "$t/base.pth" --peft bone --bone_b 64 --data_file "$t/d" --ctx_len 512 \
    --micro_bsz 8 --epoch_steps 3 --grad_cp 1 --devices 1 "${dev[@]}" --proj_dir "$t/run" --progress 0 || exit 1
"$py" bench/memory_plan.py --model_preset 1.6b --peft bone --bone_b 64 --micro_bsz 8 --ctx_len 512 \
    --strategy deepspeed_stage_2 --devices 1 --grad_cp 1 --measured "$t/run/metrics.csv"
'

# ---- (c)-(f) -------------------------------------------------------------------------------
TRAIN_ARGS=(--methods "$TRAIN_STEP_METHODS" --grad_cp "$TRAIN_STEP_GRAD_CP" --presets 1.6b,3b
            --json "$OUT/train_step.json")
case $MODE in
    gpu)
        run_step c "$OUT/build.txt" 240 "$PY" -c "$BUILD_PY"
        run_step d "$OUT/pytest_gpu.txt" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
        run_step p "$OUT/paths.txt" 150 bash -c '"$0" scripts/check_paths.py --device cuda && "$0" \
            bench/bench_train_step.py --device cuda --dtype bf16 --presets 1.6b --micro_bsz 8 --ctx_len 512 \
            --methods bone --ce chunked,plain --grad_cp 1 --steps 2 --warmup 1 --repeats 1' "$PY"
        run_step m "$OUT/paths.txt" 240 bash -c "$MEMPLAN_SH" "$PY" gpu
        run_step e "$OUT/bench_wkv.txt" 90 "$PY" bench/bench_wkv.py --cuda
        run_step f "$OUT/train_step.txt" 270 "$PY" bench/bench_train_step.py --device cuda \
            --dtype bf16 --ctx_len 512 --micro_bsz 1 "${TRAIN_ARGS[@]}"
        ;;
    cpu)  # dry run: the same plumbing at sizes a CPU finishes in seconds
        skip_step c "no CUDA (CPU dry run: the kernel needs a GPU build of torch)" "$OUT/build.txt"
        run_step d "$OUT/pytest_gpu.txt" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
        run_step p "$OUT/paths.txt" 120 bash -c '"$0" scripts/check_paths.py --device cpu && "$0" \
            bench/bench_train_step.py --device cpu --dtype fp32 --presets 1.6b --n_layer 2 --n_embd 128 \
            --vocab 4096 --micro_bsz 2 --ctx_len 64 --methods bone --ce chunked,plain --grad_cp 0 --steps 1 \
            --warmup 1 --repeats 1 --threads 1' "$PY"
        run_step m "$OUT/paths.txt" 120 bash -c "$MEMPLAN_SH" "$PY" cpu
        run_step e "$OUT/bench_wkv.txt" 90 "$PY" bench/bench_wkv.py --T 64 --H 4 --repeats 1
        run_step f "$OUT/train_step.txt" 120 "$PY" bench/bench_train_step.py --device cpu \
            --dtype bf16 --n_layer 2 --n_embd 128 --vocab 256 --ctx_len 32 --steps 2 --warmup 1 --threads 1 \
            "${TRAIN_ARGS[@]}"
        ;;
    none)
        for key in c d p m e f; do skip_step "$key" "no CUDA"; done
        ;;
esac

# ---- (g) summary ---------------------------------------------------------------------------
SUMMARY="$OUT/summary.md"
{
    echo "# GPU check ($MODE mode), $(date -u +"%Y-%m-%d %H:%M UTC"), ${SECONDS}s"
    echo
    grep -m1 '^device ' "$OUT/env.txt" 2>/dev/null || echo "device: none (no CUDA)"
    grep -m1 '^torch ' "$OUT/env.txt" 2>/dev/null
    echo
    echo "| step | what | status | seconds | log |"
    echo "|---|---|---|---|---|"
    for key in "${STEPS[@]}"; do
        echo "| $key | ${TITLE[$key]} | ${STATUS[$key]:-not run} | ${SECS[$key]:-0} | ${LOG[$key]:-} |"
    done
    echo
    echo "## Key figures"
    echo
    echo "- kernel build: $(grep -m1 'kernel build+load' "$OUT/build.txt" 2>/dev/null || echo 'n/a')"
    echo "- gpu tests: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest_gpu.txt" 2>/dev/null | tail -n 1 || echo 'n/a')"
    echo "- self-check / packed / chunked CE:"
    grep -E -- '-> |peak memory chunked CE' "$OUT/paths.txt" 2>/dev/null | grep -v 'tokens per step' |
        sed 's/^ */    /' || echo "    n/a"
    echo "- memory plan vs measured ($MODE mode; on the CPU the measured figure is a tiny run's RSS):"
    grep -E 'plan / measured|deepspeed_stage_2 x1 \|' "$OUT/paths.txt" 2>/dev/null | sed 's/^ */    /' || echo "    n/a"
    echo "- WKV6 forward+backward:"
    grep -E 'CUDA kernel .* ms|speed-up|chunked \(wkv6' "$OUT/bench_wkv.txt" 2>/dev/null | sed 's/^ */    /' ||
        echo "    n/a"
    echo
    if [ -s "$OUT/train_step.json" ]; then
        timeout 60 "$PY" bench/bench_train_step.py --report "$OUT/train_step.json" 2>&1
    else
        echo "training-step benchmark: no results"
    fi
} >"$SUMMARY"
echo
cat "$SUMMARY"

if ((FAILED)); then exit 1; fi
if [ "$MODE" = none ]; then exit 3; fi
exit 0
