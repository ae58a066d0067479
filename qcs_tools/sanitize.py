#!/usr/bin/env python3
"""Run the op tests against sanitizer builds of qcs_ext's extensions.

Builds ``qcs_ext._C`` (csrc/ops.cpp, the CPU driver csrc/cpu/csa_cpu.cpp and the inner
kernels csrc/cpu/kernels_*.cpp) and ``qcs_ext._emulated`` (the CUDA kernels under the host
emulation layer, csrc/emulation/csa_emulated.cpp) with

- ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer (``-fno-sanitize-recover=all``),
- ``tsan``: ThreadSanitizer, plus ``csrc/emulation/sanitize/tsan_openmp.cpp``, which makes
  the fork/join of the OpenMP regions behind ``at::parallel_for`` visible to TSan,

into ``build/sanitize-<name>/`` (never into the package tree or ``.venv``), next to a copy
of the ``qcs_ext`` Python files, and runs pytest on the op tests in a subprocess with the
sanitizer runtime preloaded into the (uninstrumented) Python and that copy first on the
import path. A plugin (``qcs_tools/sanitize_pytest_plugin.py``) refuses to start unless the
sanitized extensions are the ones imported and the runtime is loaded. Any sanitizer
report fails the run: the runtimes halt on the first one, and the output is scanned too.

Usage::

    .venv/bin/python -m qcs_tools.sanitize                  # both sanitizers, full profile
    .venv/bin/python -m qcs_tools.sanitize asan --profile fast
    .venv/bin/python -m qcs_tools.sanitize tsan -- -x -k gradcheck   # extra pytest arguments
    .venv/bin/python -m qcs_tools.sanitize asan --build-only

Profiles: ``full`` runs every test of tests/test_ops.py and tests/test_emulated.py (slow
ones included); ``fast`` the subset CI runs (tests/test_sanitizers.py), see FAST_SUBSET.
Builds are cached by a hash of the sources, flags, compiler and torch version.
Exit status: 0 clean; 1 test failures; 2 build failure; 3 sanitizer report.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# What a sanitizer report looks like in the output (the runtimes' headers).
REPORT_MARKERS = (
    "ERROR: AddressSanitizer",
    "WARNING: ThreadSanitizer",
    "ERROR: ThreadSanitizer",
    "runtime error:",  # UBSan
    "ERROR: LeakSanitizer",
    "SUMMARY: AddressSanitizer",
    "SUMMARY: ThreadSanitizer",
    "SUMMARY: UndefinedBehaviorSanitizer",
    "Sanitizer: CHECK failed",  # the runtime itself gave up
    "Sanitizer:DEADLYSIGNAL",
)

# The exit codes the runtimes are told to use (ASAN_OPTIONS/UBSAN_OPTIONS, TSAN_OPTIONS).
SANITIZER_EXIT_CODES = (86, 66)

# libgomp entries that synchronise threads; tsan_openmp.cpp models GOMP_parallel only, so
# a build importing any other must fail loudly instead of giving false reports or none.
OMP_SYNC_ALLOWED = {"GOMP_parallel"}

TEST_FILES = ["tests/test_ops.py", "tests/test_emulated.py"]  # the op tests

# The CI subset (tests/test_sanitizers.py), one pytest -k expression over TEST_FILES: every
# code path of both extensions at small shapes (forward and backward of both ops, every
# mode, scope and CPU instruction set, N = 1 and partial vectors, 1000 channels; the
# emulated kernels in all four dtypes, both epilogues, ties, zero distances, constant
# input; strided input; at::parallel_for on 2 threads; the argument checks), chosen from
# the per-test times of the full profile so that it fits CI's budget under both sanitizers.
FAST_SUBSET = (
    "(test_ops and not emulated and not cuda and ("
    "(test_float64_matches_reference and (shape0 or shape3 or shape5)) "
    "or (test_float32_error_within_twice_reference_error and shape4 and sd) "
    "or test_pair_matches_reference or test_special_inputs_match_reference or test_rows_sum_to_one "
    "or test_results_do_not_depend_on_thread_count or test_strided_and_expanded_inputs "
    "or test_half_precision or test_saved_tensors_are_small or test_native_op_checks_direct_calls "
    "or test_native_checks_match_python_checks or test_bad_input)) "
    "or (test_emulated and ("
    "2-7-sd-batch-dtype0 or 2-7-d-sample-dtype1 or 1-7-s-sample-dtype3 or 2-1-sd-sample-dtype2 "
    "or test_pair_matches_reference[1-1-sample-dtype0] "
    "or test_pair_matches_reference[3-7-batch-dtype1] "
    "or test_streaming_path_small[sd-batch] or test_zero_distances[sd-sample] "
    "or test_constant_inputs[s-batch] or test_gradcheck_duplicated_tokens[batch] "
    "or test_batch_scope_ties_across_batch[sample] or test_bad_input_errors "
    "or test_non_contiguous_input "
    "or test_saved_tensors_layout))"
)


@dataclass
class Sanitizer:
    """One sanitizer configuration: flags, runtime to preload, options, extra sources."""

    name: str
    flags: list[str]
    runtime: str  # shared library preloaded into Python (must come first)
    env: dict[str, str]
    instrumented_symbol: str  # an import every instrumented object has
    extra_c_sources: list[Path] = field(default_factory=list)


SANITIZERS = {
    "asan": Sanitizer(
        name="asan",
        flags=["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
               "-fno-omit-frame-pointer"],
        runtime="libasan.so",
        env={
            # CPython and torch keep allocations alive until exit by design: leaks would
            # all be theirs, so leak checking is off; everything else halts on first error.
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"
                            ":strict_init_order=1:check_initialization_order=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=86",
        },
        instrumented_symbol="__asan_report_",
    ),
    "tsan": Sanitizer(
        name="tsan",
        flags=["-fsanitize=thread"],
        runtime="libtsan.so",
        env={
            # ignore_noninstrumented_modules: interceptors (memcpy, memset, ...) called from
            # uninstrumented libraries (torch, libgomp, BLAS) do not report; their own
            # threading is invisible to TSan anyway. Races in our code are all reported.
            "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1"
                            ":ignore_noninstrumented_modules=1:report_signal_unsafe=0",
        },
        instrumented_symbol="__tsan_",
        extra_c_sources=[CSRC / "emulation" / "sanitize" / "tsan_openmp.cpp"],
    ),
}


def _cxx() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or "g++"


def _torch_paths() -> tuple[list[str], list[str], bool]:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    return include_paths(), library_paths(), bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def _extensions() -> dict[str, dict]:
    """The two extensions, with the sources and flags setup.py uses (at -O1 -g1)."""
    common = ["-std=c++20", "-O1", "-g1", "-fPIC", "-fvisibility=hidden",
              "-DPy_LIMITED_API=0x030a0000"]
    return {
        "_C": {
            "sources": [CSRC / "ops.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))],
            "flags": common + ["-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
                               "-fopenmp"],
            "includes": [CSRC],
            "ldflags": ["-fopenmp"],
        },
        "_emulated": {
            "sources": sorted((CSRC / "emulation").glob("*.cpp")),
            "flags": common + ["-pthread"],
            "includes": [CSRC, CSRC / "emulation", CSRC / "cuda"],
            "ldflags": ["-pthread"],
        },
    }


def build_dir(name: str) -> Path:
    """Where the ``name`` build lives; ``QCS_SANITIZE_BUILD`` overrides ``build/``."""
    return Path(os.environ.get("QCS_SANITIZE_BUILD", ROOT / "build")) / f"sanitize-{name}"


def runtime_path(san: Sanitizer) -> str:
    """Absolute path of the sanitizer runtime of the compiler that built the extensions."""
    path = subprocess.run([_cxx(), f"-print-file-name={san.runtime}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(
            f"{_cxx()} has no {san.runtime} (got {path!r}): install the sanitizer runtime")
    return os.path.realpath(path)


def _libstdcxx() -> str:
    path = subprocess.run([_cxx(), "-print-file-name=libstdc++.so.6"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"{_cxx()} does not know where libstdc++.so.6 is (got {path!r})")
    return os.path.realpath(path)


def _fingerprint(san: Sanitizer, exts: dict, torch_inc: list[str], abi: bool) -> str:
    h = hashlib.sha256()
    version = subprocess.run([_cxx(), "--version"], capture_output=True, text=True).stdout
    import torch

    h.update(f"{version}|{torch.__version__}|{abi}|{san.flags}|{torch_inc}".encode())
    for name, ext in sorted(exts.items()):
        h.update(f"{name}|{ext['flags']}|{ext['ldflags']}".encode())
    for path in sorted([*CSRC.rglob("*"), *map(Path, san.extra_c_sources)]):
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _run_checked(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{' '.join(cmd)}\n"
                           f"{proc.stderr[-6000:]}")


def _imported_symbols(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def build(name: str, jobs: int | None = None, verbose: bool = True) -> Path:
    """Build the sanitized extensions for ``name`` (cached); return the import root.

    The import root holds ``qcs_ext/`` (the package's Python files and the two sanitized
    shared objects); ``stamp`` beside it holds the fingerprint of the build. Concurrent
    builds of one sanitizer wait for each other (a lock file); shared objects are replaced
    atomically, so a run still using the previous build is not disturbed.
    """
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(name, jobs, verbose)


def _build_locked(name: str, jobs: int | None, verbose: bool) -> Path:
    san = SANITIZERS[name]
    torch_inc, torch_lib, abi = _torch_paths()
    exts = _extensions()
    out = build_dir(name)
    site = out / "site"
    pkg = site / "qcs_ext"
    stamp = out / "stamp"
    fingerprint = _fingerprint(san, exts, torch_inc, abi)
    up_to_date = stamp.exists() and stamp.read_text() == fingerprint and all(
        (pkg / f"{n}.so").exists() for n in exts)

    # The Python side is copied every time (cheap), so edits to qcs_ext/*.py are tested.
    pkg.mkdir(parents=True, exist_ok=True)
    for py in (ROOT / "qcs_ext").glob("*.py"):
        shutil.copy2(py, pkg / f"{py.name}.tmp")
        os.replace(pkg / f"{py.name}.tmp", pkg / py.name)
    if up_to_date:
        if verbose:
            print(f"[sanitize] {name}: build up to date ({out})", flush=True)
        return site

    start = time.time()
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    py_inc = sysconfig.get_paths()["include"]
    objdir = out / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    base = [f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}", *[f"-I{p}" for p in torch_inc], f"-I{py_inc}"]
    compiles, links = [], {}
    for ext_name, ext in exts.items():
        sources = list(ext["sources"]) + (san.extra_c_sources if ext_name == "_C" else [])
        objs = []
        for src in sources:
            obj = objdir / f"{ext_name}.{src.stem}.o"
            cmd = [_cxx(), "-c", *ext["flags"], *san.flags,
                   *[f"-I{p}" for p in ext["includes"]], *base, str(src), "-o", str(obj)]
            compiles.append((cmd, f"compiling {src.relative_to(ROOT)} ({name})"))
            objs.append(str(obj))
        links[ext_name] = [_cxx(), "-shared", *objs, *ext["ldflags"], *san.flags,
                           *[f"-L{p}" for p in torch_lib], *[f"-Wl,-rpath,{p}" for p in torch_lib],
                           "-lc10", "-ltorch_cpu", "-ltorch", "-ldl",
                           "-o", str(pkg / f"{ext_name}.so.tmp")]
    if verbose:
        print(f"[sanitize] {name}: compiling {len(compiles)} files with {jobs} jobs into {out}",
              flush=True)
    # Biggest first: the ATen translation units dominate.
    compiles.sort(key=lambda c: -Path(c[0][-3]).stat().st_size)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(_run_checked, cmd, what) for cmd, what in compiles]:
            fut.result()
    for ext_name, cmd in links.items():
        _run_checked(cmd, f"linking {ext_name} ({name})")
        symbols = _imported_symbols(pkg / f"{ext_name}.so.tmp")
        if not any(s.startswith(san.instrumented_symbol) for s in symbols):
            raise RuntimeError(f"{pkg / ext_name}.so: no {san.instrumented_symbol}* imports: "
                               "not instrumented?")
        if name == "tsan":
            unmodelled = {s for s in symbols if s.startswith("GOMP_")} - OMP_SYNC_ALLOWED
            if "GOMP_parallel" in symbols:  # the shim defines it locally: calls must bind to it
                raise RuntimeError(f"{ext_name}.so calls libgomp's GOMP_parallel directly: "
                                   "the TSan annotations (tsan_openmp.cpp) are not linked in")
            if unmodelled:
                raise RuntimeError(
                    f"{ext_name}.so imports OpenMP entries {sorted(unmodelled)} that "
                    "csrc/emulation/sanitize/tsan_openmp.cpp does not annotate for TSan")
    for ext_name in links:
        os.replace(pkg / f"{ext_name}.so.tmp", pkg / f"{ext_name}.so")
    stamp.write_text(fingerprint)
    if verbose:
        print(f"[sanitize] {name}: built in {time.time() - start:.0f} s", flush=True)
    return site


def run_env(name: str, site: Path) -> dict[str, str]:
    """Environment for a Python process that imports the sanitized build at ``site``."""
    san = SANITIZERS[name]
    env = dict(os.environ)
    env.update(san.env)
    # The runtime must come first. libstdc++ right after it: Python does not link it, and
    # ASan's __cxa_throw interceptor needs the real one at start-up (else every C++
    # exception, e.g. a ValueError from an argument check, dies in a CHECK failure).
    preload = [runtime_path(san), _libstdcxx()]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    env["LD_PRELOAD"] = ":".join(preload)
    # The sanitized site first, so its qcs_ext shadows the checkout's; the checkout after it
    # for qcs_tools (the plugin) and tests/ for the tests' helpers.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), str(ROOT / "tests")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["QCS_SANITIZER"] = name
    env["QCS_SANITIZED_SITE"] = str(site)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def pytest_command(profile: str, extra: list[str], junit: Path) -> list[str]:
    """pytest's arguments for ``profile`` (``fast``: FAST_SUBSET; ``full``: everything)."""
    # --capture=sys: pytest must not capture file descriptor 2, or a report written there by
    # a runtime that then exits the process is lost with pytest's capture file.
    # -o pythonpath=: pyproject's pythonpath (the checkout) would go first on sys.path and
    # its unsanitized qcs_ext would shadow the sanitized copy.
    args = ["-p", "qcs_tools.sanitize_pytest_plugin", "-p", "no:cacheprovider",
            "-o", "pythonpath=", "--capture=sys", "--rootdir", str(ROOT),
            "-c", str(ROOT / "pyproject.toml"), "-q", f"--junitxml={junit}",
            *[str(ROOT / f) for f in TEST_FILES]]
    if profile == "fast":
        args += ["-k", FAST_SUBSET]
    return [*args, *extra]


def _junit_counts(junit: Path) -> dict[str, int]:
    """tests / failures / errors / skipped from pytest's JUnit XML (zeros if it is missing,
    e.g. when a sanitizer stopped the process)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not junit.exists():
        return counts
    for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


@dataclass
class RunResult:
    """Outcome of the pytest runs of one sanitizer."""

    name: str
    returncode: int
    passed: int
    failed: int
    skipped: int
    seconds: float
    reports: list[str]
    output: str


def run_tests(name: str, profile: str = "full", extra: list[str] | None = None,
              jobs: int | None = None, echo: bool = True, timeout: float | None = None,
              env_extra: dict[str, str] | None = None, tag: str | None = None) -> RunResult:
    """Build (if needed) and run the op tests of ``profile`` under sanitizer ``name``.

    ``extra``: more pytest arguments; ``env_extra``: more environment variables; ``tag``
    names the log and JUnit files in the build directory (default: the profile).
    """
    site = build(name, jobs=jobs, verbose=echo)
    env = {**run_env(name, site), **(env_extra or {})}
    out_dir = build_dir(name)
    junit = out_dir / f"junit-{tag or profile}.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *pytest_command(profile, extra or [], junit)]
    if echo:
        print(f"[sanitize] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the
    # checkout's qcs_ext (the unsanitized build) must not shadow the sanitized copy.
    if echo:  # stream it: the full profile takes a while
        proc = subprocess.Popen(cmd, cwd=site, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        chunks = []
        for line in proc.stdout:
            chunks.append(line)
            sys.stdout.write(line)
        output, code = "".join(chunks), proc.wait()
    else:
        try:
            done = subprocess.run(cmd, cwd=site, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  timeout=timeout)
            output, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as exc:
            partial = (exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes)
                       else (exc.stdout or ""))
            output, code = partial + f"\n[sanitize] timed out after {timeout} s\n", 124
    (out_dir / f"last-{tag or profile}.log").write_text(output)
    reports = [line for line in output.splitlines() if any(m in line for m in REPORT_MARKERS)]
    counts = _junit_counts(junit)
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    return RunResult(name, code, passed, failed, counts["skipped"], time.time() - start, reports,
                     output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sanitizers", nargs="*", metavar="SANITIZER",
                        help="asan, tsan (default: both)")
    parser.add_argument("--profile", choices=("fast", "full"), default="full")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="compile jobs (default $MAX_JOBS or 2)")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `--` goes to pytest untouched (argparse would take it as sanitizers).
    split = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:split])
    extra = unknown + argv[split + 1:]
    names = args.sanitizers or list(SANITIZERS)
    for name in names:
        if name not in SANITIZERS:
            parser.error(f"unknown sanitizer {name!r}: choose from {', '.join(SANITIZERS)}")
    status = 0
    for name in names:
        try:
            if args.build_only:
                build(name, jobs=args.jobs)
                continue
            res = run_tests(name, args.profile, extra, jobs=args.jobs)
        except RuntimeError as exc:
            print(f"[sanitize] {name}: {exc}", file=sys.stderr)
            return 2
        verdict = "clean" if not res.reports and res.returncode == 0 and res.passed else "FAILED"
        print(f"[sanitize] {name} ({args.profile}): {res.passed} passed, {res.failed} failed, "
              f"{res.skipped} skipped, {len(res.reports)} sanitizer report lines, "
              f"{res.seconds:.0f} s: {verdict}", flush=True)
        for line in res.reports[:20]:
            print(f"[sanitize]   {line}")
        if res.reports or res.returncode in SANITIZER_EXIT_CODES:
            status = max(status, 3)
        elif res.returncode != 0:
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
