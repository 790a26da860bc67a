#!/usr/bin/env bash
# The device script of issue 9: one or two calls on an H100/H200, everything into OUTDIR.
#
#   bash tools/gpu_check.sh OUTDIR              # on the GPU (the device tool: OUTDIR=$OUT)
#   bash tools/gpu_check.sh OUTDIR --rehearse   # on CPU: the same stages at toy sizes
#
# Stages, in order of what matters most, each capped by what is left of the budget
# (GPU_CHECK_BUDGET_S, default 420 s; --rehearse 1200 s with every cap tripled, the CPU being
# slower), so the script ends in time whatever hangs or runs long; a stage that would start
# with under 15 s left is skipped. All of them take about 800 s on an H200: the script ends
# by printing the second call that runs what the first skipped or cut short
# (GPU_CHECK_STAGES="bench-attention,native" runs only the named stages; merge and summary
# always run):
#   env          device, driver, versions
#   check        every kernel's pallas_mosaic_gpu where it has one, then every kernel's
#                pallas_gpu, natively against its float32 reference, forward and gradients
#                (tools/gpu_check.py check): kernels_check.json
#   bench-*      pytest bench/ --benchmark-only at paper sizes, one JSON per group (ceilings,
#                train, norm_swiglu, norm_qkv_rope, block_out, attention, decode, forward,
#                others) so a group cut short loses only itself; PALM_BENCH_DEADLINE makes
#                pytest skip the tests that would start too late
#   profile      one training step of the "1b" preset (tools/profile.py) with
#                pallas_mosaic_gpu (falling back to pallas_gpu, then xla, if that fails;
#                GPU_CHECK_PROFILE_IMPLS=xla for another): profile.json (its report inside),
#                compiled_hlo.txt.gz (the step after XLA's passes), the Perfetto trace
#   native       tests marked `gpu` (the Mosaic GPU kernels' ragged cases, compiled natively)
#   merge        the groups into bench.json with the ratios (vs_cudnn, vs_matmul, mfu_vs_matmul,
#                vs_copy_bound) in each extra_info
#   summary      summary.md: stages, kernel checks, issue 9's goals, every benchmark, the profile
# OUTDIR gets at most 8 flat files (the device tool returns no more): summary.md, log.txt,
# stages.tsv, kernels_check.json, bench.json, profile.json, compiled_hlo.txt.gz,
# perfetto_trace.json.gz. Scratch (pytest groups' JSON, the raw trace, the compilation cache)
# goes to a temporary folder.
set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--rehearse]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUTDIR=$1; shift
REHEARSE=0
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    *) usage ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$ROOT"
# The device machine has our dependencies but no install of this package: use the checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# PYTHON, else the checkout's .venv (`make test` makes it: the CPU rehearsal), else python3
# (the device machine, where .venv does not travel and python3 has the dependencies).
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
# Stages compile some of the same programs (the training step in bench-train and profile).
export JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache"
# One process at a time holds the GPU: let it have more than JAX's default 75% (the 1b
# training step's state, gradients and activations take ~47 GB at B=1).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if [ "$REHEARSE" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}
  SCALE=3
  CHECK_ARGS=(--shapes tiny --dtype float32 --impls pallas_gpu)  # Mosaic GPU: bf16 only
  BENCH_ARGS=(--bench-size tiny --bench-impls xla,pallas_gpu,cudnn,pallas_gpu_mha,pallas_gpu_decode)
  PROFILE_ARGS=(--preset tiny --batch-size 2 --seq-len 32 --steps 1 --warmup 1)
  TRAIN_IMPLS=()
else
  BUDGET=${GPU_CHECK_BUDGET_S:-420}
  SCALE=1
  CHECK_ARGS=(--shapes paper --dtype bfloat16)
  # GPU_CHECK_BENCH_ARGS adds to these, e.g. "--bench-model-batch 2" on an H200.
  read -r -a EXTRA <<< "${GPU_CHECK_BENCH_ARGS:-}"
  BENCH_ARGS=(--bench-size paper ${EXTRA[@]+"${EXTRA[@]}"})
  PROFILE_ARGS=(--preset 1b --batch-size "${GPU_CHECK_PROFILE_BATCH:-1}" --seq-len 2048 --steps 2 --warmup 1)
  # The whole model with the Mosaic GPU kernels too (Triton for rope, decoding and the saved
  # gates): a model benchmark runs pallas_mosaic_gpu only when named.
  TRAIN_IMPLS=(--bench-impls pallas_mosaic_gpu,xla,pallas_gpu)
fi
# Timing: each case's rounds fill half a second (at least 3), after the harness's own warm-up.
TIMING=(--benchmark-only --benchmark-max-time=0.5 --benchmark-min-rounds=3 -q -rs
        --benchmark-columns=median,iqr,rounds,iterations)

exec > >(tee -a "$OUTDIR/log.txt") 2>&1
: > "$OUTDIR/stages.tsv"
echo "gpu_check: $(date -u +%FT%TZ) budget ${BUDGET}s rehearse=$REHEARSE root=$ROOT out=$OUTDIR scratch=$SCRATCH"

# stage NAME CAP_S MARGIN_S COMMAND...: runs COMMAND under `timeout` for min(CAP, budget left);
# pytest inside it skips tests once MARGIN_S remain (PALM_BENCH_DEADLINE), so it can finish
# the test in flight and write its JSON. Appends "NAME<TAB>exit<TAB>seconds" to stages.tsv.
stage() {
  local name=$1 cap=$(($2 * SCALE)) margin=$(($3 * SCALE)); shift 3
  if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ ",$GPU_CHECK_STAGES,merge,summary," != *",$name,"* ]]; then
    printf '%s\tskipped (not selected)\t0\n' "$name" >> "$OUTDIR/stages.tsv"
    return 0
  fi
  local left=$((BUDGET - SECONDS))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped, ${left}s of the budget left"
    printf '%s\tskipped (budget)\t0\n' "$name" >> "$OUTDIR/stages.tsv"
    return 0
  fi
  echo "=== $name (up to ${limit}s, $(date -u +%T))"
  local start=$SECONDS rc
  PALM_BENCH_DEADLINE=$(( $(date +%s) + limit - margin )) \
    timeout -k 20 -s TERM "$limit" "$@"
  rc=$?
  [ "$rc" = 124 ] && echo "=== $name: stopped at its ${limit}s limit"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUTDIR/stages.tsv"
  return 0
}

bench_group() {  # bench_group NAME CAP MARGIN PYTEST_ARGS...
  local name=$1 cap=$2 margin=$3; shift 3
  PARTS+=("$SCRATCH/bench-$name.json")
  stage "bench-$name" "$cap" "$margin" "$PY" -m pytest "${TIMING[@]}" "${BENCH_ARGS[@]}" \
    --benchmark-json="$SCRATCH/bench-$name.json" "$@"
}

PARTS=()
# In order of what the next decision needs: the H200 run of 2026-11-27 (bench/results/) gave
# the timings behind the caps; with the default budget the stages up to the projections fit
# one call, and the script ends by printing the second call that runs the rest.
stage env 60 0 "$PY" tools/gpu_check.py env
stage check 100 0 "$PY" tools/gpu_check.py check --out "$OUTDIR/kernels_check.json" "${CHECK_ARGS[@]}"
bench_group ceilings 60 15 bench/test_ceilings.py
# The training step first among the benchmarks: MFU is the goal; each compiles a 16-layer model.
bench_group train 110 40 bench/test_model.py -k test_train_step ${TRAIN_IMPLS[@]+"${TRAIN_IMPLS[@]}"}
# A card with room for it (an H200's 141 GB) also times B = 4, where Adafactor's ~19 ms of
# elementwise passes over 1.5 B float32 parameters (the H200 profile at B = 1) are amortised
# over 8192 tokens: the batch at which the MFU goal can be met. B = 1 took ~47 GB, each
# further sequence ~20 GB (the float32 logits and their cotangents, 256k wide).
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ "$REHEARSE" = 0 ] && [ "${GPU_MIB:-0}" -ge 120000 ]; then
  bench_group train-b4 90 30 bench/test_model.py -k test_train_step --bench-model-batch 4 \
    --bench-impls pallas_mosaic_gpu,xla
fi
stage profile 75 0 "$PY" tools/gpu_check.py profile "$OUTDIR" "$SCRATCH/profile" \
  ${GPU_CHECK_PROFILE_IMPLS:+--impls "$GPU_CHECK_PROFILE_IMPLS"} -- "${PROFILE_ARGS[@]}"
bench_group norm_swiglu 60 15 bench/test_kernels.py -k test_norm_swiglu
bench_group norm_qkv_rope 50 15 bench/test_kernels.py -k test_norm_qkv_rope
bench_group block_out 45 15 bench/test_kernels.py -k test_block_out
bench_group attention 100 25 bench/test_kernels.py -k test_mq_flash_attention
# The demo model's decode cases are the CPU story (cache against recompute); on a GPU only the
# large model's and the attention kernel's are timed.
if [ "$REHEARSE" = 1 ]; then
  bench_group decode 120 20 bench/test_decode.py bench/test_kernels.py -k "test_generate or test_mq_decode_attention"
else
  bench_group decode 90 25 bench/test_decode.py bench/test_kernels.py -k "test_generate and not demo or test_mq_decode_attention"
fi
if [ "$REHEARSE" = 0 ] && grep -rqs "pytest.mark.gpu\b" tests/; then
  # 16 cases, each compiling its kernels: 14 passed in 100 s on the H200.
  stage native 150 0 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider
fi
bench_group forward 60 30 bench/test_model.py -k test_forward
bench_group others 45 15 bench/test_kernels.py -k "test_rope or test_block_in"

# Bookkeeping runs whatever the budget says: it takes seconds.
BUDGET=$((SECONDS + 60)); SCALE=1
stage merge 30 0 "$PY" tools/gpu_check.py merge "$OUTDIR/bench.json" "${PARTS[@]}"
stage summary 30 0 "$PY" tools/gpu_check.py summary "$OUTDIR"
[ -f "$OUTDIR/summary.md" ] && sed -n '/^### Goals/,/^### Every/p' "$OUTDIR/summary.md"
cat "$OUTDIR/stages.tsv"
echo "gpu_check: done in ${SECONDS}s; files: $(ls "$OUTDIR" | tr '\n' ' ')"
# What a second call would run: the stages skipped for the budget and those stopped at their
# cap (exit 124), bookkeeping aside.
LEFT=$(awk -F '\t' '$1 != "merge" && $1 != "summary" && ($2 == "skipped (budget)" || $2 == "124") {print $1}' \
  "$OUTDIR/stages.tsv" | paste -sd, -)
[ -n "$LEFT" ] && echo "gpu_check: second call: GPU_CHECK_STAGES=$LEFT bash tools/gpu_check.sh \$OUT" \
  "(then: python tools/gpu_check.py merge all.json first/bench.json second/bench.json)"
rm -rf "$SCRATCH"
