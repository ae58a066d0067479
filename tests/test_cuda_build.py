"""Build-level checks of the CUDA kernels that need no GPU.

- the compile gate: every csrc/cuda/*.cu compiled by nvcc for sm_80 and sm_90 with
  ``ptxas -v``; fails on register spills or local memory and prints the resource table;
- the emulated kernels under ThreadSanitizer and under AddressSanitizer + UBSan: the
  torch-free driver tests/cpp/csa_emulated_driver.cpp (the same build as the
  CMake targets emulated_driver_tsan / emulated_driver_asan) must run clean.

Skipped when nvcc (gate) or a C++ compiler (sanitizers) is missing, except in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
DRIVER = ROOT / "tests" / "cpp" / "csa_emulated_driver.cpp"
INCLUDES = [f"-I{ROOT / d}" for d in ("csrc", "csrc/emulation", "csrc/cuda")]


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _have_nvcc() -> bool:
    from qcs_tools import cuda_compile_gate
    return cuda_compile_gate.find_nvcc() is not None


def _skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _build_driver(exe: Path, flags: list[str], kernels_dir: Path | None = None) -> Path:
    """Build the emulated driver into ``exe`` with ``flags``; ``kernels_dir`` holds a
    modified ``csa_kernels.cuh`` found before the shipped one (negative controls)."""
    cxx = _cxx()
    if cxx is None:
        _skip_or_fail("no C++ compiler")
    first = [f"-I{kernels_dir}"] if kernels_dir is not None else []
    build = subprocess.run([cxx, "-std=c++20", *flags, *first, *INCLUDES, str(DRIVER), "-o",
                            str(exe), "-pthread"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


@pytest.mark.slow
def test_cuda_compile_gate():
    if not _have_nvcc():
        _skip_or_fail("nvcc not found (set CUDA_HOME)")
    proc = subprocess.run(
        [sys.executable, "-m", "qcs_tools.cuda_compile_gate", "--arch", "80", "--arch", "90"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    print(proc.stdout)  # the registers / shared memory table (pytest -s shows it)
    print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, (
        f"compile gate failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout


# kind: (compiler flags, environment, driver arguments); TSan runs the quick subset.
SANITIZERS = {
    "plain": (["-O2"], {}, []),
    "tsan": (
        ["-O1", "-g", "-fsanitize=thread"],
        {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1"},
        ["quick"],
    ),
    "asan_ubsan": (
        [
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
        ],
        {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
        [],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SANITIZERS))
def test_emulated_kernels_sanitizers(kind, tmp_path):
    flags, env_extra, args = SANITIZERS[kind]
    exe = _build_driver(tmp_path / f"driver_{kind}", ["-Wall", "-Wextra", *flags])
    env = {**os.environ, **env_extra}
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=900)
    out = run.stdout + run.stderr
    print(out[-6000:])
    for marker in (
        "WARNING: ThreadSanitizer",
        "ERROR: AddressSanitizer",
        "runtime error:",
        "LeakSanitizer",
    ):
        assert marker not in out, f"{kind}: sanitizer report\n{out[-6000:]}"
    assert run.returncode == 0, f"{kind}: driver exited with {run.returncode}\n{out[-6000:]}"
    assert "all checks passed" in run.stdout


@pytest.mark.slow
def test_a_missing_syncthreads_is_reported_in_the_tsan_build(tmp_path):
    """Negative control: with the barrier after the fused epilogue's load into dynamic
    shared memory removed, the ThreadSanitizer build of the driver reports the race. The
    emulation's own race checker reports it (kernel, byte, both threads) before TSan could:
    its per-word bookkeeping serialises shared-memory accesses, so TSan's part is global
    memory (test_a_race_between_concurrent_blocks_is_reported_by_tsan)."""
    src = (ROOT / "csrc" / "cuda" / "csa_kernels.cuh").read_text()
    load = "mat[e] = sim ? ext - d[e] : d[e] - ext;\n    __syncthreads();"
    assert load in src, "the fused epilogue changed: update this negative control"
    (tmp_path / "csa_kernels.cuh").write_text(
        src.replace(load, "mat[e] = sim ? ext - d[e] : d[e] - ext;", 1)
    )
    exe = _build_driver(tmp_path / "driver_racy", ["-O1", "-g", "-fsanitize=thread"],
                        kernels_dir=tmp_path)
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}
    run = subprocess.run([str(exe), "quick"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "dynamic shared memory at byte" in run.stderr, run.stderr[-3000:]
    assert "qcs emulation race: kernel kern::fused_epilogue_kernel" in run.stderr


# ---- build flags (risks 2 and 3) and the one-command GPU check ---------------------------


def _gate_module():
    from qcs_tools import cuda_compile_gate

    return cuda_compile_gate


def test_build_flags_exact_math_and_ptx(monkeypatch):
    """No --use_fast_math; SASS for sm_80 and sm_90 plus PTX for compute_90 and the newest
    architecture nvcc names; QCS_CUDA_ARCHS replaces the SASS list and is checked."""
    import runpy

    flags = runpy.run_path(str(ROOT / "csrc" / "cuda" / "build_flags.py"))
    assert not any("fast_math" in f or "ftz" in f for f in flags["NVCC_FLAGS"])
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(
            a, 0, stdout="compute_80\ncompute_90\ncompute_100\ncompute_120\n", stderr=""
        ),
    )
    monkeypatch.delenv("QCS_CUDA_ARCHS", raising=False)
    gen = flags["gencode_flags"]("nvcc")
    assert gen == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_120,code=compute_120",
    ]
    monkeypatch.setenv("QCS_CUDA_ARCHS", "9.0")
    assert flags["gencode_flags"]("nvcc")[0] == "-gencode=arch=compute_90,code=sm_90"
    monkeypatch.setenv("QCS_CUDA_ARCHS", "sm90")
    with pytest.raises(SystemExit, match="QCS_CUDA_ARCHS"):
        flags["sass_archs"]()
    setup = (ROOT / "setup.py").read_text()
    assert "use_fast_math" not in setup and "build_flags.py" in setup


def test_gate_spots_fast_math_instructions():
    """The gate's PTX scan: fast-math PTX is caught, the exact instructions libdevice uses
    either way (ex2.approx.ftz.f32 in expf, rcp.approx.ftz.f64 in double division) are not."""
    gate = _gate_module()
    exact = (
        "\tsqrt.rn.f32 \t%f2, %f1;\n\tdiv.rn.f32 %f3, %f1, %f2;\n\tex2.approx.ftz.f32 %f4, %f3;\n"
        "\trcp.approx.ftz.f64 %fd2, %fd1;\n\tfma.rn.f32 %f5, %f1, %f2, %f3;\n"
    )
    assert gate.fast_math_instructions(exact) == []
    fast = ("\tadd.ftz.f32 %f2, %f1, %f1;\n@%p1 sqrt.approx.ftz.f32 %f3, %f2;\n"
            "\tdiv.full.f32 %f4, %f3, %f2;\n")
    assert gate.fast_math_instructions(fast) == [
        "add.ftz.f32",
        "div.full.f32",
        "sqrt.approx.ftz.f32",
    ]


def test_gpu_check_without_a_gpu_says_so_and_exits_3(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_gpu_check_usage_errors(tmp_path):
    for args in ([], [str(tmp_path), "--everything"]):
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_gpu_check_build_step(tmp_path):
    """The script's build step (here: the CPU extension, in a copy of the sources) builds
    against the installed torch, logs, and checks the import; summary.md says ok."""
    src = tmp_path / "src"
    for part in ("csrc", "qcs_ext", "python", "scripts", "setup.py", "pyproject.toml"):
        p = ROOT / part
        if p.is_dir():
            shutil.copytree(
                p, src / part, ignore=shutil.ignore_patterns("*.so", "__pycache__", "build")
            )
        elif p.exists():
            shutil.copy2(p, src / part)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": sys.executable,
        "QCS_GPU_CHECK_BUILD_ONLY_ON_CPU": "1",
        "PYTHONPATH": "",
    }
    proc = subprocess.run(
        ["bash", str(src / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--build-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3000,
    )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert proc.returncode == 0, summary + (tmp_path / "out" / "build.log").read_text()[-3000:]
    assert "| build | ok |" in summary and "| import | ok |" in summary
    assert list((src / "qcs_ext").glob("_C*.so"))
    assert "has_fused_kernel cpu True" in (tmp_path / "out" / "import.log").read_text()


@pytest.fixture(scope="module")
def planted_driver(tmp_path_factory):
    """The emulated driver, built once for the negative controls of the emulation (the
    launch validator, the watchdog, the race checker, the mask check, the block order:
    each a mode of the driver)."""
    return _build_driver(tmp_path_factory.mktemp("planted") / "driver", ["-O0"])


def test_launch_validator_negative_controls(planted_driver):
    """Planted over-limit launches (gridDim.y 65536, 2048 threads, block z 65, an empty
    grid, 49 KiB dynamic shared memory without opt-in, above the opted-in limit) are each
    refused with the kernel's name and the limit; a launch at the limits runs."""
    run = _planted(planted_driver, "controls")
    assert run.returncode == 0, run.stdout[-4000:]
    assert run.stdout.count(" refused: emulated launch of planted_kernel") == 6
    assert "all refused as expected" in run.stdout


@pytest.mark.parametrize("host_threads", ["0", "1"], ids=["fibers", "host-threads"])
def test_watchdog_reports_a_planted_deadlock(planted_driver, host_threads):
    """Negative control of the emulator's watchdog: a kernel whose threads wait for each
    other forever (thread 0 at a barrier, the others spinning until it passes) is
    reported (kernel, block, barrier, threads arrived) and aborted, whether the block's
    threads are fibers or host threads."""
    run = _planted(planted_driver, "deadlock", QCS_EMULATION_WATCHDOG_S="2",
                   QCS_EMULATION_HOST_THREADS=host_threads)
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "deadlock in kernel planted_deadlock, block (0, 0, 0)" in run.stderr
    assert "at a __syncthreads with 1 of 64 threads arrived" in run.stderr


@pytest.mark.parametrize("host_threads", ["0", "1"], ids=["fibers", "host-threads"])
def test_watchdog_reports_a_deadlock_at_barriers(planted_driver, host_threads):
    """Thread 0 at __syncthreads, the rest of its warp at __syncwarp, the other warp at
    __syncthreads: every thread waits. Reported with the barrier and its count (with
    fibers at once: no thread can be resumed)."""
    run = _planted(planted_driver, "barrier-deadlock", QCS_EMULATION_WATCHDOG_S="2",
                   QCS_EMULATION_HOST_THREADS=host_threads)
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "deadlock in kernel planted_barrier_deadlock, block (0, 0, 0)" in run.stderr
    assert ("at a __syncthreads with 33 of 64 threads arrived" in run.stderr
            or "with 31 of 32 threads arrived" in run.stderr), run.stderr


def _planted(exe, mode: str, seed: int | None = None, **env_extra) -> subprocess.CompletedProcess:
    """Run the driver in ``mode`` (a planted control) with a short watchdog."""
    env = {**os.environ, "QCS_EMULATION_WATCHDOG_S": "20", **env_extra}
    if seed is not None:
        env["QCS_EMULATION_SEED"] = str(seed)
    return subprocess.run([str(exe), mode], capture_output=True, text=True, env=env,
                          timeout=120)


def test_race_checker_reports_a_planted_race(planted_driver):
    """Threads 0 and 40 write and read one shared cell with no barrier between: reported
    with kernel, block, array, element and both threads (in whichever order they ran)."""
    run = _planted(planted_driver, "race")
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "qcs emulation race: kernel planted_race, block (0, 0, 0), shared cell[0]" in run.stderr
    assert ("thread 0 wrote it and thread 40 read it" in run.stderr
            or "thread 40 read it and thread 0 wrote it" in run.stderr), run.stderr


def test_a_shuffle_is_not_a_memory_fence(planted_driver):
    """Lane 0 writes shared memory, the warp shuffles, lane 1 reads: a race (a shuffle
    orders no memory); with a __syncwarp between them the same kernel runs clean."""
    run = _planted(planted_driver, "shuffle-fence")
    assert run.returncode != 0, run.stdout
    assert "qcs emulation race: kernel planted_shuffle_fence" in run.stderr
    clean = _planted(planted_driver, "syncwarp-fence")
    assert clean.returncode == 0, clean.stderr
    assert "not reported (out = 7)" in clean.stdout


def test_warp_collective_mask_is_checked(planted_driver):
    """All 32 lanes call __shfl_xor_sync with a mask naming 16: reported and aborted."""
    run = _planted(planted_driver, "mask")
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "kernel planted_mask" in run.stderr
    assert "__shfl_xor_sync with mask 0x0000ffff" in run.stderr


def test_blocks_run_in_a_seeded_random_order(planted_driver):
    """Every block of a 64-block grid overwrites one word: the block left is the one run
    last. Run one block at a time (so that the order alone decides), it varies between
    launches and seeds (it is never always block 63, the index order) and is the same for
    the same seed."""
    def lasts(seed):
        run = _planted(planted_driver, "order", seed, QCS_EMULATION_CONCURRENT_BLOCKS="1")
        assert run.returncode == 0, run.stderr
        return [int(x) for x in run.stdout.split(":")[1].split()]
    first = lasts(0)
    assert len(set(first)) > 1 and first != lasts(1), first
    assert lasts(1) == lasts(1)


def test_race_checker_catches_a_missing_barrier_in_the_kernels(tmp_path):
    """The kernels with the barrier that ends block_sum removed (scratch reused by the
    next reduction while other warps still read it): the driver reports the race."""
    source = (ROOT / "csrc" / "cuda" / "csa_kernels.cuh").read_text()
    barrier = "  __syncthreads();  // scratch may be reused right after\n"
    assert source.count(barrier) == 1
    (tmp_path / "csa_kernels.cuh").write_text(source.replace(barrier, ""))
    exe = _build_driver(tmp_path / "driver", ["-O0"], kernels_dir=tmp_path)
    run = subprocess.run([str(exe), "quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "qcs emulation race: kernel" in run.stderr and "shared scratch[" in run.stderr


def test_blocks_run_concurrently_with_their_own_shared_memory(planted_driver):
    """64 blocks each store their index in a shared cell and read it back after a barrier:
    no block sees another's (one copy per running block)."""
    run = _planted(planted_driver, "shared-per-block")
    assert run.returncode == 0 and "shared per block: 0 mismatches" in run.stdout, run.stdout


def test_a_race_between_concurrent_blocks_is_reported_by_tsan(tmp_path):
    """Every block increments one global word without an atomic: with blocks running two at
    a time, ThreadSanitizer reports the race (run one block at a time, it could not)."""
    exe = _build_driver(tmp_path / "driver_tsan", ["-O1", "-g", "-fsanitize=thread"])
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    run = subprocess.run([str(exe), "cross-block"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 66, (run.returncode, run.stderr[-2000:])
    assert "ThreadSanitizer: data race" in run.stderr and "planted_cross_block" in run.stderr
    alone = subprocess.run([str(exe), "cross-block"], capture_output=True, text=True,
                           env=dict(env, QCS_EMULATION_CONCURRENT_BLOCKS="1"), timeout=300)
    assert alone.returncode == 0 and "out = 64" in alone.stdout, alone.stderr[-2000:]


def test_emulated_wmma_against_independent_products(planted_driver):
    """The emulated warp-matrix API: __float_to_tf32 rounds to nearest with ties away from
    zero; one TF32 mma equals the double product of the inputs truncated to 19 bits (and
    is ~1e-3 off the exact one); 3xTF32 (the kernels' Tf32x3) is within float32 rounding
    of the exact product; a bfloat16 mma has exact products and float accumulation."""
    run = _planted(planted_driver, "wmma")
    assert run.returncode == 0, run.stdout[-2000:]
    assert "FAIL" not in run.stdout and "3xTF32 by" in run.stdout


@pytest.mark.parametrize(
    "mode,message",
    [("wmma-misaligned", "pointer not 32-byte (256-bit) aligned"),
     ("wmma-ldm", "ldm not a multiple of 16 bytes")],
)
def test_emulated_wmma_reports_misuse(planted_driver, mode, message):
    """Negative controls: a fragment load from a pointer 4 bytes off a 32-byte boundary,
    and one with an ldm of 9 floats, are reported (kernel, block, thread) and abort."""
    run = _planted(planted_driver, mode)
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "qcs emulation: kernel wmma_products, block (0, 0, 0), thread" in run.stderr
    assert message in run.stderr


def test_one_tf32_mma_alone_fails_the_accuracy_checks(tmp_path):
    """Negative control of 3xTF32: the kernels with Tf32x3::mma cut to its single
    big x big product fail the driver's float32 checks (wmma products and the N = 49
    tensor-core forward against the float64 reference)."""
    source = (ROOT / "csrc" / "cuda" / "csa_kernels.cuh").read_text()
    small_terms = ("    wmma::mma_sync(acc, a_small, b_big, acc);\n"
                   "    wmma::mma_sync(acc, a_big, b_small, acc);\n")
    assert source.count(small_terms) == 1
    (tmp_path / "csa_kernels.cuh").write_text(source.replace(small_terms, ""))
    exe = _build_driver(tmp_path / "driver", ["-O1"], kernels_dir=tmp_path)
    wmma = subprocess.run([str(exe), "wmma"], capture_output=True, text=True, timeout=120)
    assert wmma.returncode != 0 and "FAIL 3xTF32 keeps float32 accuracy" in wmma.stdout
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "FAIL maps float32 vs reference" in run.stdout


@pytest.mark.parametrize(
    "mode,message",
    [("static-smem", "kernel planted_static_49k: shared other_half brings its static shared "
                     "memory to 50176 B (with 0 B dynamic): above the 48 KiB limit"),
     ("static-plus-dynamic", "kernel planted_static_40k: shared big brings its static shared "
                             "memory to 40960 B (with 10240 B dynamic): above the kernel's "
                             "shared memory limit")],
)
def test_static_shared_memory_is_checked(planted_driver, mode, message):
    """Negative controls of the static shared memory check: 49 KiB of shared arrays, and
    40 KiB with 10 KiB of dynamic shared memory, are reported; 40 + 8 KiB runs."""
    run = _planted(planted_driver, mode)
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert message in run.stderr
    ok = _planted(planted_driver, "static-within-limits")
    assert ok.returncode == 0 and "static within limits: ran (out = 1)" in ok.stdout


def test_dynamic_shared_memory_is_race_checked(planted_driver):
    """Negative controls of the dynamic shared memory checker: a write and a read of one
    float by threads 0 and 40 with no barrier, and a write one float past the launch's 64
    bytes, are reported (kernel, block, byte, threads) and abort."""
    run = _planted(planted_driver, "dynamic-race")
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert "qcs emulation race: kernel planted_dynamic, block (0, 0, 0)" in run.stderr
    assert ("race: thread 0 wrote it and thread 40 read it" in run.stderr
            or "race: thread 40 read it and thread 0 wrote it" in run.stderr), run.stderr
    run = _planted(planted_driver, "dynamic-range")
    assert run.returncode != 0 and "not reported" not in run.stdout
    assert ("kernel planted_dynamic, block (0, 0, 0), thread 0: dynamic shared memory at byte "
            "64: out of range" in run.stderr)
