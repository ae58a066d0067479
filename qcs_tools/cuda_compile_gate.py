#!/usr/bin/env python3
"""CUDA compile gate: compile every csrc/cuda/*.cu for the shipped architectures with
``ptxas -v`` and fail on register spills or any local memory (stack frame).

Works without a GPU (only nvcc is needed). Prints one row per kernel and architecture:
registers, static shared memory, stack frame (local memory) and spill bytes. The flags
are the ones setup.py builds qcs_ext._C with (csrc/cuda/build_flags.py plus torch's own
nvcc flags), so the gate sees the code that ships. It also fails when the PTX carries
flush-to-zero or approximate sqrt/division (what --use_fast_math brings), or when the
build embeds no PTX for GPUs newer than the SASS targets.

Usage: .venv/bin/python -m qcs_tools.cuda_compile_gate [--arch 80 --arch 90] [--markdown FILE]
Exit status: 0 clean, 1 spills/local memory found, 2 compilation failed / no nvcc.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_FLAGS = ROOT / "csrc" / "cuda" / "build_flags.py"  # setup.py reads the same file
# Instructions --use_fast_math brings: flush-to-zero arithmetic, approximate sqrt/division.
# Left out: ex2.approx.ftz.f32 (libdevice's exact expf is built on it) and
# rcp.approx.ftz.f64 (the seed of the IEEE double division), fast math or not.
FAST_MATH_PTX = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?!ex2\.approx\.ftz\.f32|rcp\.approx\.ftz\.f64)"
                           r"(?:[a-z]+(?:\.[a-z0-9]+)*\.ftz\b[.a-z0-9]*|(?:sqrt|div|rcp)\.approx[.a-z0-9]*|"
                           r"div\.full[.a-z0-9]*))", re.M)


def build_flags() -> dict:
    """NVCC_FLAGS, SASS_ARCHS, ptx_archs(nvcc), gencode_flags(nvcc) of csrc/cuda/build_flags.py."""
    return runpy.run_path(str(BUILD_FLAGS))


def fast_math_instructions(ptx: str) -> list[str]:
    """The flush-to-zero / approximate instructions in a PTX text (empty when exact)."""
    return sorted({m.group(1) for m in FAST_MATH_PTX.finditer(ptx)})


def find_nvcc() -> str | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if (
            c
            and (Path(c) / "bin" / "nvcc").exists()
            and (Path(c) / "include" / "cuda_runtime.h").exists()
        ):
            return str(Path(c) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    return nvcc


def torch_flags() -> list[str]:
    import torch
    import torch.utils.cpp_extension as ce

    torch_dir = Path(torch.__file__).resolve().parent
    inc = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    # The toolkit may lack the cuBLAS headers that ATen/cuda/CUDAContext.h includes;
    # torch's CUDA wheels bundle them (nvidia/cu*/include).
    inc += [
        Path(p).resolve() for p in glob.glob(str(torch_dir.parent / "nvidia" / "cu*" / "include"))
    ]
    inc.append(Path(sysconfig.get_paths()["include"]))
    flags = [f"-I{p}" for p in inc]
    flags += list(ce.COMMON_NVCC_FLAGS)
    flags += [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DQCS_WITH_CUDA=1",
        "-Xcompiler",
        "-fPIC",
    ]
    return flags


ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[dict]:
    rows: list[dict] = []
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {
                "kernel": m.group(1),
                "arch": m.group(2),
                "regs": None,
                "smem": 0,
                "stack": 0,
                "spill_st": 0,
                "spill_ld": 0,
            }
            rows.append(current)
            continue
        if current is None:
            continue
        m = STACK.search(line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        m = USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            s = SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True
    ).stdout.splitlines()
    pretty = {}
    for n, d in zip(names, out):
        d = d.replace("qcs::kern::", "").replace("c10::", "").replace("qcs::", "")
        d = re.sub(r"\(.*\)$", "", d)  # drop the parameter list
        d = re.sub(r"^void ", "", d)
        pretty[n] = d
    return pretty


def check_ptx(keep_dir: Path, obj: Path, ptx_archs: list[int]) -> list[str]:
    """Problems with the PTX of one compiled source: fast-math instructions in any kept
    .ptx file, no PTX generated for some compute_XX in ``ptx_archs``, or (where cuobjdump
    exists) that PTX missing from the object."""
    problems = []
    ptx_files = sorted(keep_dir.glob("*.ptx"))
    if not ptx_files:
        return [f"nvcc kept no PTX for {obj.name}"]
    for a in ptx_archs:
        if not any(f"compute_{a}" in f.name for f in ptx_files):
            problems.append(f"{obj.name}: nvcc generated no PTX for compute_{a}")
    for f in ptx_files:
        found = fast_math_instructions(f.read_text(errors="replace"))
        if found:
            problems.append(f"{f.name}: fast-math instructions {', '.join(found[:8])}")
        f.unlink()  # the next source's files must not be mistaken for these
    cuobjdump = shutil.which("cuobjdump") or (str(Path(find_nvcc()).parent / "cuobjdump"))
    if Path(cuobjdump).exists():
        listing = subprocess.run(
            [cuobjdump, "--list-ptx", str(obj)], capture_output=True, text=True
        ).stdout
        for a in ptx_archs:
            if f"sm_{a}" not in listing and f"compute_{a}" not in listing:
                problems.append(
                    f"{obj.name}: no embedded PTX for compute_{a} "
                    f"(cuobjdump --list-ptx: {listing!r})"
                )
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--arch", action="append", default=None, help="SM version, e.g. 80 (repeatable)"
    )
    ap.add_argument("--markdown", type=Path, help="also write the table to this file (markdown)")
    ap.add_argument(
        "--source", action="append", type=Path, help="the .cu files (default: csrc/cuda/*.cu)"
    )
    args = ap.parse_args()
    flags = build_flags()
    archs = args.arch or [str(a) for a in flags["SASS_ARCHS"]]
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_compile_gate: no nvcc found (set CUDA_HOME)", file=sys.stderr)
        return 2
    ptx_archs = flags["ptx_archs"](nvcc)
    sources = args.source or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        print("cuda_compile_gate: no .cu sources", file=sys.stderr)
        return 2
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx_archs]
    base = [
        nvcc,
        *flags["NVCC_FLAGS"],
        "-Xptxas",
        "-v",
        *gencode,
        f"-I{ROOT / 'csrc'}",
        f"-I{ROOT / 'csrc' / 'cuda'}",
        *torch_flags(),
    ]
    rows: list[dict] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            obj = Path(tmp) / (Path(src).stem + ".o")
            cmd = [*base, "--keep", f"--keep-dir={tmp}", "-c", str(src), "-o", str(obj)]
            print(
                f"cuda_compile_gate: nvcc {src.name} for sm_{', sm_'.join(archs)} + PTX compute_"
                f"{', compute_'.join(map(str, ptx_archs))}",
                file=sys.stderr,
                flush=True,
            )
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                print(f"cuda_compile_gate: FAILED to compile {src}", file=sys.stderr)
                return 2
            rows += parse_ptxas(proc.stdout + proc.stderr)
            problems += check_ptx(Path(tmp), obj, ptx_archs)
    if not rows:
        print("cuda_compile_gate: ptxas reported no kernels", file=sys.stderr)
        return 2
    names = demangle(sorted({r["kernel"] for r in rows}))
    rows.sort(key=lambda r: (names[r["kernel"]], r["arch"]))
    width = max(len(names[r["kernel"]]) for r in rows)
    header = f"| {'kernel':<{width}} | arch  | regs | smem (B) | stack (B) | spill st/ld (B) |"
    sep = f"|{'-' * (width + 2)}|-------|------|----------|-----------|-----------------|"
    lines = [header, sep]
    bad = []
    for r in rows:
        lines.append(
            f"| {names[r['kernel']]:<{width}} | {r['arch']:<5} | {r['regs']:>4} | {r['smem']:>8} | "
            f"{r['stack']:>9} | {r['spill_st']:>7} / {r['spill_ld']:<5} |"
        )
        if r["stack"] or r["spill_st"] or r["spill_ld"]:
            bad.append(r)
    table = "\n".join(lines)
    print(table)
    print(
        "\n(smem: static shared memory; the fused epilogue also takes "
        "(N*N + 2N + 2RN) * sizeof(acc) "
        "bytes of dynamic shared memory, <= 48 KiB, chosen at launch)"
    )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    for p in problems:
        print(f"cuda_compile_gate: FAIL {p}", file=sys.stderr)
    if bad or problems:
        for r in bad:
            print(
                f"cuda_compile_gate: FAIL {names[r['kernel']]} on {r['arch']}: "
                f"stack {r['stack']} B, "
                f"spills {r['spill_st']}/{r['spill_ld']} B (local memory)",
                file=sys.stderr,
            )
        return 1
    print(
        f"cuda_compile_gate: OK, {len(rows)} kernel builds, no spills, no local memory; "
        f"PTX for compute_{', compute_'.join(map(str, ptx_archs))} embedded; "
        "no flush-to-zero or approximate sqrt/division",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
