"""nvcc flags and target architectures of the CUDA kernels: the one place both setup.py
and scripts/cuda_compile_gate.py read them from (loaded by path, not imported as a package).

- No ``--use_fast_math``: it flushes subnormals to zero (a squared distance below
  1.2e-38 became 0, a false duplicate with a zero gradient) and swaps sqrt, division and
  exp for approximations, so GPU results would drift from the emulated ones. The kernels
  are memory-bound: the exact instructions cost nothing measurable.
- Machine code (SASS) for sm_80 (A100; also runs on sm_86/sm_89) and sm_90 (H100/H200),
  plus PTX for compute_90 and for the newest architecture the nvcc at hand knows, so the
  driver can compile the kernels for GPUs newer than sm_90 (Blackwell and later).
  ``QCS_CUDA_ARCHS="90"`` (``;``-separated SM numbers) replaces the SASS list, e.g. to
  build only for the GPU of the machine (scripts/gpu_check.sh does).
"""

from __future__ import annotations

import os
import re
import subprocess

NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
SASS_ARCHS = [80, 90]
PTX_FLOOR = 90  # PTX for compute_90 runs (JIT-compiled) on every GPU from sm_90 on


def sass_archs() -> list[int]:
    """The SM versions to build machine code for (QCS_CUDA_ARCHS overrides SASS_ARCHS)."""
    env = os.environ.get("QCS_CUDA_ARCHS", "").strip()
    if not env:
        return list(SASS_ARCHS)
    try:
        archs = sorted({int(a.replace(".", "")) for a in env.split(";") if a.strip()})
    except ValueError:
        raise SystemExit(
            f"QCS_CUDA_ARCHS must be SM numbers separated by ';' (e.g. '80;90'), got {env!r}"
        )
    if not archs or min(archs) < 70:
        raise SystemExit(f"QCS_CUDA_ARCHS must name SM versions of 70 or above, got {env!r}")
    return archs


def newest_arch(nvcc: str) -> int:
    """The highest compute_XX that ``nvcc --list-gpu-arch`` names (PTX_FLOOR if it cannot tell)."""
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return PTX_FLOOR
    found = [int(x) for x in re.findall(r"compute_(\d+)\b", out)]
    return max(found) if found else PTX_FLOOR


def ptx_archs(nvcc: str) -> list[int]:
    """compute_XX versions to embed PTX for: compute_90 and the newest nvcc knows."""
    return sorted({PTX_FLOOR, newest_arch(nvcc)})


def gencode_flags(nvcc: str) -> list[str]:
    """``-gencode`` flags for the SASS and PTX targets (replace torch's TORCH_CUDA_ARCH_LIST)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass_archs()]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx_archs(nvcc)]
    return flags
