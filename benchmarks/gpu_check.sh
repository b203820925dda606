#!/usr/bin/env bash
# One-shot GPU check (issue 13 §3): install, run the device-relevant tests on the device, then the sampler,
# decode and speculative benchmarks on it (bf16 on cuda, fp32 on cpu), tables into one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--device cuda|cpu] [--quick] [--no-install]
#
# OUT_DIR defaults to outputs/gpu_check/. It receives device.txt, tests.txt, bench_sampler.md,
# bench_decode.md, bench_speculative_*.md, log.txt and summary.txt. Sized for < 8 minutes on one GPU:
# one prompt per kind, 48 new tokens, 3 alternating repeats, and only the three cells with goals in the
# issue (T=0 code, T=0 story, balanced code). --quick shrinks everything to a smoke run (a few minutes on
# two CPU cores: `bash benchmarks/gpu_check.sh --device cpu --quick` proves the script end to end).
#
# Models: the Qwen2.5-Coder pair when prepared in $RTDLM_CACHE (default ~/.cache/rtdlm), else the
# in-process tiny-random model (the summary says which). torch is used as installed (pip keeps a torch
# that satisfies the requirement). A failing step is recorded and the next one still runs; the exit code
# is the number of failed steps.
set -uo pipefail

DEVICE=cuda
QUICK=0
INSTALL=1
OUT=outputs/gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) OUT="$1"; shift ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
FAILED=0
: > "$OUT/log.txt"
: > "$OUT/summary.txt"

log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME TIMEOUT_S OUTFILE CMD...: run one step, its stdout to OUTFILE, stderr to the log.
step() {
    local name="$1" limit="$2" outfile="$3"
    shift 3
    log "$name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$outfile" 2>> "$OUT/log.txt"
    local rc=$?
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        note "ok     $name (${took}s) -> $(basename "$outfile")"
    else
        FAILED=$((FAILED + 1))
        note "FAILED $name (rc=$rc, ${took}s) -> $(basename "$outfile"), see log.txt"
    fi
}

if [ "$INSTALL" = 1 ]; then
    log "pip install -e .[test]"
    python -m pip install -q -e ".[test]" >> "$OUT/log.txt" 2>&1 || { note "FAILED pip install"; FAILED=$((FAILED + 1)); }
fi

if [ "$DEVICE" = cuda ]; then DTYPE=bfloat16; else DTYPE=float32; fi
step "device" 120 "$OUT/device.txt" python - "$DEVICE" <<'EOF'
import sys, platform, torch, transformers
device = torch.device(sys.argv[1])
if device.type == "cuda":
    assert torch.cuda.is_available(), "CUDA requested but not available"
    print(f"device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
else:
    print(f"device: cpu ({platform.processor() or platform.machine()})")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
EOF
cat "$OUT/device.txt" | tee -a "$OUT/summary.txt"

CACHE="${RTDLM_CACHE:-$HOME/.cache/rtdlm}"
if ls -d "$CACHE"/qwen2.5-coder-0.5b-* "$CACHE"/qwen2.5-coder-1.5b-* > /dev/null 2>&1 && [ "$QUICK" = 0 ]; then
    SMALL=qwen2.5-coder-0.5b; TARGET=qwen2.5-coder-1.5b; LOGITS=real; EXIT_LAYERS="14"
else
    SMALL=tiny-random; TARGET=tiny-random; LOGITS=synthetic; EXIT_LAYERS="1"
fi
note "models: target $TARGET, draft/decode model $SMALL, sampler logits $LOGITS, dtype $DTYPE"

# -- tests on the device ----------------------------------------------------------------------------------
TESTS="tests/test_sampler.py tests/test_autoregressive.py tests/test_speculative.py \
tests/test_speculation_policy.py tests/test_decoder_state.py"
[ -f tests/test_speculative_state.py ] && TESTS="$TESTS tests/test_speculative_state.py"
if [ "$QUICK" = 1 ]; then MARKS="not slow and not real_model"; else MARKS="not real_model"; fi
# shellcheck disable=SC2086
step "tests (RTDLM_TEST_DEVICE=$DEVICE, -m '$MARKS')" 300 "$OUT/tests.txt" \
    env RTDLM_TEST_DEVICE="$DEVICE" python -m pytest -q -p no:cacheprovider -m "$MARKS" $TESTS
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"

# -- benchmarks --------------------------------------------------------------------------------------------
# bench_sampler.py and bench_decode.py have no --device option: they run through this shim, which moves
# their inputs / models to the device (and synchronizes CUDA inside the sampler's timer), written to
# OUT_DIR/on_device.py.
cat > "$OUT/on_device.py" <<'PYEOF'
import sys, torch
sys.path.insert(0, "benchmarks")
device, script, args = torch.device(sys.argv[1]), sys.argv[2], sys.argv[3:]
bench = __import__(script)
if hasattr(bench, "load_model"):
    load = bench.load_model
    bench.load_model = lambda name, dtype=None, device_=None, **kw: load(name, dtype=dtype, device=device)
if hasattr(bench, "encode_prompts"):
    encode = bench.encode_prompts
    def encode_any(model, texts):
        if hasattr(model.tokenizer, "apply_chat_template"):
            return encode(model, texts)
        return [model.tokenizer.encode(t) for t in texts]
    bench.encode_prompts = encode_any
if hasattr(bench, "time_row"):
    row = bench.time_row
    bench.time_row = lambda n, c, logits, history, r: row(n, c, logits.to(device), history.to(device), r)
    median_us = bench.median_us
    def synced(fn, repeats):
        def call():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return median_us(call, repeats)
    bench.median_us = synced
sys.argv = [script + ".py", *args]
print(f"<!-- {script} on {device} -->")
bench.main()
PYEOF

if [ "$QUICK" = 1 ]; then
    SAMPLER_ARGS="--logits synthetic --vocab 32000 --batches 1 8 --repeats 6"
    DECODE_ARGS="--model $SMALL --dtypes $DTYPE --presets deterministic --batches 1 --max-new-tokens 8 --repeats 2"
else
    SAMPLER_ARGS="--logits $LOGITS --batches 1 8 32 --repeats 30"
    DECODE_ARGS="--model $SMALL --dtypes $DTYPE --presets deterministic balanced --batches 1 8 --max-new-tokens 32 --repeats 3"
fi
# shellcheck disable=SC2086
step "bench_sampler" 180 "$OUT/bench_sampler.md" python "$OUT/on_device.py" "$DEVICE" bench_sampler $SAMPLER_ARGS
# shellcheck disable=SC2086
step "bench_decode" 240 "$OUT/bench_decode.md" python "$OUT/on_device.py" "$DEVICE" bench_decode $DECODE_ARGS

SPEC="python benchmarks/bench_speculative.py --device $DEVICE --dtypes $DTYPE --target $TARGET --draft $SMALL \
--exit-layers $EXIT_LAYERS --num-prompts 1 --repeats 3"
if [ "$QUICK" = 1 ]; then
    # shellcheck disable=SC2086
    step "bench_speculative (smoke)" 240 "$OUT/bench_speculative_smoke.md" \
        $SPEC --presets deterministic --prompts code --gammas 2 --lookup-gammas 2 --max-new-tokens 12
else
    # shellcheck disable=SC2086
    step "bench_speculative T=0 code+story" 330 "$OUT/bench_speculative_t0.md" \
        $SPEC --presets deterministic --prompts code story --gammas 2 4 --lookup-gammas 2 4 --max-new-tokens 48
    # shellcheck disable=SC2086
    step "bench_speculative balanced code" 200 "$OUT/bench_speculative_balanced.md" \
        $SPEC --presets balanced --prompts code --gammas 2 4 --lookup-gammas 2 4 --max-new-tokens 48
fi

note "tables in $OUT; $FAILED failed step(s)"
exit "$FAILED"
