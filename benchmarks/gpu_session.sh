#!/usr/bin/env bash
# Everything worth measuring on a lent GPU, in order of value, in phases small enough for one
# device `run` call each (10 minutes at most per call, 30 minutes of device time per session).
#
#   bash benchmarks/gpu_session.sh PHASE...      phases: tests estimate engine kernels tp search moe fp8 cp
#
# Run it through the device tool from the repo root, with the wheels carried (BENCHMARKS.md, "Status
# of the GPU measurements", has the exact calls):
#   1. run  carry [".whl"]  timeout_s 600  `bash benchmarks/gpu_session.sh tests estimate`
#   2. run  carry [".whl"]  timeout_s 600  `bash benchmarks/gpu_session.sh engine kernels`
#   3. run  carry [".whl"]  timeout_s 600  `bash benchmarks/gpu_session.sh tp search`
#   4. run  carry [".whl"]  timeout_s 600  `bash benchmarks/gpu_session.sh moe fp8`
#   5. run  carry [".whl"]  timeout_s 300  `bash benchmarks/gpu_session.sh cp`
#
# Each step has its own `timeout`, so one hang costs that step, not the lease; every script rewrites
# its JSON after each row, so a step cut short keeps what it measured. Steps work in $WORK
# (/tmp/gpu_session: kept between calls while the machine stays warm, so a rerun of `search` resumes
# its grid). The device tool brings back at most 8 files from $OUT, so after EVERY step (a call cut
# off at its limit still returns what was done) $OUT holds just: summary.txt (device, driver,
# versions; then step, exit code, seconds, 124 = hit its timeout), session.tar.gz (all of $WORK:
# logs, results, search folders) and each step's main result file:
#   estimate_vs_probe-gpu.jsonl + .md, engine-<model>.json, kernels-{elementwise,lce}.json,
#   tp_slice.json, search-results.json + search-grid.jsonl, moe.json, fp8.json, cp.json
# (so run no more phases in one call than the groups above: more would pass the 8 files).
#
# Durations on one H100 are ESTIMATES from the work each step does (none of this has run on a GPU
# yet: read summary.txt after the first session and correct them here):
#   tests     ~3 min  (timeouts 100 + 140 s) the `gpu`-marked tests (Triton kernels at LLM shapes,
#                     bf16), then all of tests/test_kernels.py on CUDA tensors (~60 cases, each a
#                     Triton compile of a second or two)
#   estimate  ~5 min  (timeout 290 s) 22 plans, gpt2 to llama-3.2-1b, each one `engine.probe` process
#                     (~5 s start + model build, 2 + 5 steps of 0.1-1 s; offload and the first triton
#                     plan slower), then the leave-one-out calibration (seconds)
#   engine    ~4 min  (timeouts 120 + 140 s) gpt2 and llama-3.2-1b at micro-batch 4 and 16, modes
#                     engine / engine_compile / eager / compile: 16 processes, ~10 s each eager,
#                     ~30-40 s each compiled (the inductor compile dominates)
#   kernels   ~4 min  (timeouts 150 + 110 s) 24 norm/elementwise cases and 8 linear_cross_entropy
#                     cases x eager / compile / triton / liger; torch.compile per shape dominates
#   tp        ~1 min  (timeout 90 s) one llama-3-8b and one llama-3-70b block at tp 1, 2, 4, 8
#   search    ~6 min  (timeout 420 s) gpt2-medium: 20 sampled grid plans, then autotune / Optuna TPE /
#                     random search with 6 trials each (~26 probes of ~8 s, 3 search setups)
#   moe       ~4 min  (timeout 420 s) a MoE training step at published widths, few layers, bf16, ZeRO 0:
#                     mixtral-8x7b cut to 2 blocks (3.1B parameters, ~50 GB of states) and
#                     qwen2-57b-a14b cut to 1 (3.3B), micro-batch 1 and 2 at seq 4096: 4 probes of
#                     ~40-60 s each (the seeded CPU initialisation of 3B parameters dominates)
#   fp8       ~2 min  (timeout 150 s) Llama 3 8B's three GEMM shapes at 2 x 8192 tokens: bf16 against
#                     _scaled_mm tensorwise / rowwise (the catalog's fp8_matmul_efficiency), and a
#                     linear's fwd+bwd as torchao's Float8Linear, eager and compiled (needs torchao)
#   cp        ~2 min  (timeout 240 s) one cp rank's ring blocks (bench_cp.py: flash attention per block,
#                     no communication) for Llama 3 8B at seq 32k, 65k, 131k and cp 1, 2, 4, 8, bf16:
#                     12 rows of 7 forward+backward passes, the longest ~1.3 s each (cp 1 at 131k,
#                     ~1.4e14 FLOPs forward), plus the cost model's figures (its CPU activation fit once)
# So call 1 ~8 min, call 2 ~8 min, call 3 ~7 min; each call's timeouts sum to 510-530 s, leaving
# the wheels' install and the summary inside the tool's 600 s.
set -uo pipefail  # not -e: a failed step is a result; the next one still runs

cd "$(dirname "$0")/.."
if [[ -z ${OUT:-} ]]; then
  echo "gpu_session.sh: set OUT to the folder for logs and results (the device tool sets it)" >&2
  exit 2
fi
WORK=${WORK:-/tmp/gpu_session}
mkdir -p "$OUT" "$WORK"
PHASES=" tests estimate engine kernels tp search moe fp8 cp "
for phase in "$@"; do  # a typo found now, not after minutes of the lease
  [[ $PHASES == *" $phase "* ]] || { echo "gpu_session.sh: unknown phase '$phase' (one of:$PHASES)" >&2; exit 2; }
done
if [[ $# -eq 0 ]]; then
  echo "usage: bash benchmarks/gpu_session.sh PHASE...  (phases:$PHASES)" >&2
  exit 2
fi
if [[ -f .whl/env.sh ]]; then
  # shellcheck disable=SC1091
  source .whl/env.sh || { echo "gpu_session.sh: installing the carried wheels failed" >&2; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# step NAME SECONDS CMD...: CMD under `timeout` (SIGTERM to its whole process group, SIGKILL 20 s
# later), output in $WORK/NAME.log, one line in steps.tsv and on stdout.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=20 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$WORK/steps.tsv"
  echo "   $name: exit $rc after $(($(date +%s) - start)) s$([[ $rc == 124 ]] && echo ' (timed out)')"
  tail -n 3 "$WORK/$name.log" | cut -c1-300
}

# publish SRC:NAME...: copy each result file that exists to $OUT/NAME, then refresh summary.txt and
# session.tar.gz (built aside, then moved: a cut-off call never leaves half a file in $OUT).
publish() {
  local pair
  for pair in "$@"; do
    [[ -f $WORK/${pair%%:*} ]] && cp "$WORK/${pair%%:*}" "$OUT/${pair#*:}"
  done
  cat "$WORK/env.txt" "$WORK/steps.tsv" >"$OUT/.summary.txt" 2>/dev/null && mv "$OUT/.summary.txt" "$OUT/summary.txt"
  tar -czf /tmp/gpu_session.tar.gz -C "$WORK" . && mv /tmp/gpu_session.tar.gz "$OUT/session.tar.gz"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  $PY -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
  $PY -c 'import liger_kernel; print("liger-kernel present")' 2>/dev/null || echo "liger-kernel absent (wheels.sh --peers carries it)"
  git log -1 --format='commit %H' 2>/dev/null || echo "commit unknown (no .git in the copied tree)"
} >"$WORK/env.txt"
cat "$WORK/env.txt"

for phase in "$@"; do
  case $phase in
    tests)
      step gpu-tests 100 $PY -m pytest -q -p no:cacheprovider -m gpu tests
      publish
      step kernel-tests 140 $PY -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_kernels.py
      publish
      ;;
    estimate)
      step estimate 290 $PY benchmarks/bench_estimate.py --probe gpu --calibrate --plan-timeout 90 \
        --out "$WORK/estimate_vs_probe-gpu.jsonl"
      publish estimate_vs_probe-gpu.jsonl:estimate_vs_probe-gpu.jsonl estimate_vs_probe-gpu.md:estimate_vs_probe-gpu.md
      ;;
    engine)
      step engine-gpt2 120 $PY benchmarks/bench_engine.py --device cuda --models gpt2 --micro-batches 4 16 \
        --timeout 100 --out "$WORK/engine-gpt2.json"
      publish engine-gpt2.json:engine-gpt2.json
      step engine-llama-3.2-1b 140 $PY benchmarks/bench_engine.py --device cuda --models llama-3.2-1b \
        --micro-batches 4 16 --timeout 100 --out "$WORK/engine-llama-3.2-1b.json"
      publish engine-llama-3.2-1b.json:engine-llama-3.2-1b.json
      ;;
    kernels)
      step kernels-elementwise 150 $PY benchmarks/bench_kernels.py --device cuda \
        --ops rms_norm,layer_norm,swiglu,apply_rope --tokens 4096,16384 --hidden 2048,4096,8192 \
        --out "$WORK/kernels-elementwise.json"
      publish kernels-elementwise.json:kernels-elementwise.json
      step kernels-lce 110 $PY benchmarks/bench_kernels.py --device cuda --ops linear_cross_entropy \
        --tokens 4096,16384 --hidden 2048,4096 --vocab 32000,128256 --out "$WORK/kernels-lce.json"
      publish kernels-lce.json:kernels-lce.json
      ;;
    tp)
      step tp-slice 90 $PY benchmarks/bench_tp_slice.py --device cuda --models llama-3-8b llama-3-70b \
        --tp 1 2 4 8 --out "$WORK/tp_slice.json"
      publish tp_slice.json:tp_slice.json
      ;;
    search)
      step search 420 $PY benchmarks/bench_search.py --models gpt2-medium --global-batch 16 --seq-len 1024 \
        --budgets 6 --seeds 0 --grid-limit 20 --repeats 1 --trial-timeout 60 --out "$WORK/search"
      publish search/results.json:search-results.json search/gpt2-medium/grid.jsonl:search-grid.jsonl
      ;;
    moe)
      step moe 420 $PY benchmarks/bench_moe.py --device cuda --models mixtral-8x7b:2 qwen2-57b-a14b:1 \
        --micro-batches 1 2 --seq-len 4096 --steps 5 --warmup 2 --timeout 180 --out "$WORK/moe.json"
      publish moe.json:moe.json
      ;;
    fp8)
      step fp8 150 $PY benchmarks/bench_fp8.py --device cuda --out "$WORK/fp8.json"
      publish fp8.json:fp8.json
      ;;
    cp)
      step cp 240 $PY benchmarks/bench_cp.py --device cuda --seq 32768 65536 131072 --cp 1 2 4 8 \
        --out "$WORK/cp.json"
      publish cp.json:cp.json
      ;;
  esac
done
echo "== steps (name, exit code, seconds)"
cat "$WORK/steps.tsv"
ls -l "$OUT"
