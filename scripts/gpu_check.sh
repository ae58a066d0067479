#!/usr/bin/env bash
# One-command check of the CUDA kernels on a machine with a GPU, a CUDA toolkit and a
# PyTorch already installed (no network needed):
#
#   scripts/gpu_check.sh OUT_DIR            # everything below, ~10 minutes on an H100/H200
#   scripts/gpu_check.sh OUT_DIR --build-only
#
# Steps (each logs to OUT_DIR/<step>.log; OUT_DIR/summary.md lists status and seconds):
#   build      qcs_ext._C against this torch, SASS for this GPU only (QCS_CUDA_ARCHS) plus
#              the shipped PTX (python setup.py build_ext --inplace)
#   tests      tests/test_cuda.py (the kernels against the reference on the GPU)
#   memcheck, racecheck, synccheck
#              compute-sanitizer over a small subset of tests/test_cuda.py
#   bench      python -m qcs_tools.compare --device cuda: fused, eager, torch.compile, SDPA;
#              float32 and bfloat16; 24x49x768, 8x196x768, 8x784x768 -> OUT_DIR/bench.md
#   train      three AMP (bf16) training steps of paper-qcs: seconds per step and the share
#              of CUDA time in the CSA ops -> OUT_DIR/train.md
# Exit status: 0 all steps passed, 1 some step failed, 2 usage, 3 no GPU (one line said).
# Environment: PYTHON (default: python3), QCS_GPU_CHECK_BUILD_ONLY_ON_CPU=1 lets
# --build-only run without a GPU (CPU extension only; the test suite uses it).
set -u -o pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--build-only]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
OUT=$1
BUILD_ONLY=0
if [ $# -eq 2 ]; then [ "$2" = "--build-only" ] || usage; BUILD_ONLY=1; fi
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ON_CPU=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ "$BUILD_ONLY" = 1 ] && [ "${QCS_GPU_CHECK_BUILD_ONLY_ON_CPU:-0}" = 1 ]; then
    ON_CPU=1
  else
    echo "gpu_check: no CUDA GPU visible to $PY's torch: nothing to check (exit 3)"
    exit 3
  fi
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export QCS_NO_NETWORK=1 HF_HUB_OFFLINE=1
FAILED=0
printf '| step | status | seconds |\n|---|---|---|\n' > "$OUT/summary.md"

# run STEP TIMEOUT_S CMD...: runs CMD with a time limit, its output in OUT/STEP.log.
run() {
  local step=$1 limit=$2 start status rc
  shift 2
  start=$(date +%s)
  echo "gpu_check: $step ..." >&2
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$step.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ]; then status="TIMEOUT (${limit} s)"; else status="FAILED (rc $rc)"; fi
  [ $rc -eq 0 ] || FAILED=1
  printf '| %s | %s | %s |\n' "$step" "$status" "$(( $(date +%s) - start ))" >> "$OUT/summary.md"
  echo "gpu_check: $step: $status" >&2
  return $rc
}

# ---- environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  [ "$ON_CPU" = 1 ] || "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print('gpu', p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs')"
  command -v nvcc > /dev/null && nvcc --version | tail -1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
} > "$OUT/env.txt" 2>&1

# ---- build: SASS for this GPU (fast), the shipped PTX too (csrc/cuda/build_flags.py)
if [ "$ON_CPU" = 1 ]; then
  ARCH_ENV=(QCS_BUILD_CUDA=0)
else
  CC=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(0); print('%d%d' % p)")
  ARCH_ENV=(QCS_BUILD_CUDA=1 "QCS_CUDA_ARCHS=$CC")
fi
JOBS=$(nproc 2>/dev/null || echo 4)
run build 420 env "${ARCH_ENV[@]}" QCS_BUILD_EMULATION=0 MAX_JOBS="$JOBS" \
  "$PY" setup.py build_ext --inplace || { echo "gpu_check: the build failed, see $OUT/build.log" >&2; exit 1; }
run import 60 "$PY" -c "import qcs_ext, torch; dev = 'cpu' if $ON_CPU else 'cuda'; \
print('has_fused_kernel', dev, qcs_ext.has_fused_kernel(dev)); assert qcs_ext.has_fused_kernel(dev)"
if [ "$BUILD_ONLY" = 1 ]; then
  cat "$OUT/summary.md"
  exit $FAILED
fi

# ---- the CUDA tests, then compute-sanitizer over a small subset
run tests 240 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider --junitxml="$OUT/tests.xml"
SUBSET="(cross_matches_reference and float32 and sd-batch and (4-49 or 1-7)) or (pair_matches and float32 and 3-7) or zero_distances or subnormal"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
for tool in memcheck racecheck synccheck; do
  if [ -n "$SANITIZER" ]; then
    run "$tool" 120 "$SANITIZER" --tool "$tool" --error-exitcode 9 --target-processes all \
      "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "$SUBSET"
  else
    printf '| %s | FAILED (no compute-sanitizer) | 0 |\n' "$tool" >> "$OUT/summary.md"
    FAILED=1
  fi
done

# ---- the benchmark table (CUDA events, random upstream gradients)
run bench 240 "$PY" -m qcs_tools.compare --device cuda --dtypes float32 bfloat16 \
  --min-run-time 0.6 --rounds 3 --skip-compiled-above 196 && \
  grep -v "^  measured" "$OUT/bench.log" > "$OUT/bench.md"

# ---- three AMP training steps of paper-qcs
run train 180 "$PY" - "$OUT/train.md" <<'PYEOF'
"""Three bf16-autocast SAM steps of paper-qcs (batch 24 quadruplets, random images):
seconds per step (CUDA-synchronised) and the share of CUDA kernel time in the CSA ops."""
import statistics, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from qcs.config import LossConfig, load_config
from qcs.models import build_model, qcs_loss
from qcs.optim import SAM, build_optimizer

cfg = load_config("paper-qcs")
cfg.model.num_classes = 7
torch.manual_seed(0)
model = build_model(cfg.model).cuda()
sam = SAM(build_optimizer(model, cfg.optim), cfg.optim.sam_rho)
xs = torch.randn(model.branches, 24, 3, cfg.data.image_size, cfg.data.image_size, device="cuda")
ys = torch.randint(0, 7, (model.branches, 24), device="cuda")

def step():
    for second in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            base, cross = model.forward_branches(xs)
            loss, _ = qcs_loss(base, cross, ys, LossConfig())
        loss.backward()
        sam.second_step() if second else sam.first_step()

step()  # warm-up
times = []
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    step(); torch.cuda.synchronize()
events = prof.key_averages()
total = sum(e.self_device_time_total for e in events)
# the ops' device time with every kernel they launch (our kernels and their GEMMs)
csa = sum(e.device_time_total for e in events if e.key.startswith("qcs_ext::"))
fused = any(e.key.startswith("qcs_ext::") for e in events)
lines = ["| model | quadruplets | AMP | CSA backend | step (s), 3 runs | median | CSA share of CUDA time |",
         "|---|---|---|---|---|---|---|",
         f"| paper-qcs | 24 | bf16 | {'fused' if fused else 'reference'} | "
         + ", ".join(f"{t:.4f}" for t in times) + f" | {statistics.median(times):.4f} | "
         + (f"{100 * csa / total:.1f}% |" if total else "- |")]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF

cat "$OUT/summary.md"
exit $FAILED
