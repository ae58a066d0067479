"""Build script for qcs-ext's native extension.

``pip install --no-build-isolation .`` builds ``qcs_ext._C``: the CPU kernels always, the
CUDA kernels too when a CUDA toolkit and a CUDA build of torch are present (set
``QCS_BUILD_CUDA=0`` to skip them, ``=1`` to require them). ``QCS_BUILD_EMULATION=1`` adds
``qcs_ext._emulated``: the CUDA kernel sources compiled for the host under our emulation
layer, so they can be executed and tested on a machine without a GPU.
"""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

os.chdir(Path(__file__).resolve().parent)  # setuptools wants sources relative to here
CSRC = Path("csrc")


def _find_cuda_home() -> str | None:
    """Locate the real CUDA toolkit root.

    The ``nvcc`` on PATH may be a wrapper script (it is on our CI image), in which case
    cpp_extension's guess (the wrapper's grandparent) has no ``lib64/libcudart.so``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").exists() and (
            Path(cand) / "include" / "cuda_runtime.h"
        ).exists():
            return str(Path(cand).resolve())
    return None


def _env_flag(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in {"0", "1", "auto"}:
        sys.exit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


_cuda_home = _find_cuda_home()
if _cuda_home is not None:
    os.environ["CUDA_HOME"] = _cuda_home  # must precede the cpp_extension import
os.environ.setdefault("MAX_JOBS", "2")  # each TU that includes ATen takes ~2 GB to compile

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

build_cuda_flag = _env_flag("QCS_BUILD_CUDA")
cuda_possible = _cuda_home is not None and torch.version.cuda is not None
if build_cuda_flag == "1" and not cuda_possible:
    sys.exit("QCS_BUILD_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
build_cuda = (
    cuda_possible and build_cuda_flag != "0" and bool(glob.glob(str(CSRC / "cuda" / "*.cu")))
)

# nvcc flags and target architectures (SASS sm_80/sm_90 + PTX): csrc/cuda/build_flags.py,
# shared with the compile gate. Its -gencode flags replace TORCH_CUDA_ARCH_LIST (still set:
# without a visible GPU and without it, cpp_extension's own guess raises IndexError).
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
CUDA_BUILD = runpy.run_path(str(CSRC / "cuda" / "build_flags.py"))

# fp-contract: let the vector kernels fuse multiply-adds (ISO C++ modes turn it off).
# no-math-errno / no-trapping-math: nothing reads errno or the FP exception flags, and
# without them GCC keeps every sqrt, division and compare under a branch, so loops that
# mask a division (W = dL/dD / D where D > 0) or clamp a square root stay scalar. Neither
# flag changes a computed value (unlike -ffast-math).
CPU_CODEGEN_FLAGS = ["-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
cxx_flags = [
    "-O3",
    "-std=c++20",
    *CPU_CODEGEN_FLAGS,
    # at::parallel_for is an OpenMP template inlined into our code: without -fopenmp
    # it silently runs on one thread. Links torch's own libgomp.so.1 (same soname).
    "-fopenmp",
    "-fvisibility=hidden",
    "-DPy_LIMITED_API=0x030a0000",
]
include_dirs = [str(CSRC.resolve())]  # ninja runs elsewhere: absolute

sources = [str(CSRC / "ops.cpp")] + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
extensions = []
if build_cuda:
    # The toolkit on some images lacks the cuBLAS/cuSPARSE headers that
    # ATen/cuda/CUDAContext.h includes; torch's CUDA wheels bundle them.
    nvidia_inc = glob.glob(
        os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")
    )
    sources += sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))
    extensions.append(
        CUDAExtension(
            "qcs_ext._C",
            sources,
            include_dirs=include_dirs + [os.path.realpath(p) for p in nvidia_inc],
            define_macros=[("QCS_WITH_CUDA", "1")],
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": [
                    *CUDA_BUILD["NVCC_FLAGS"],
                    *CUDA_BUILD["gencode_flags"](str(Path(_cuda_home) / "bin" / "nvcc")),
                ],
            },
            py_limited_api=True,
        )
    )
else:
    extensions.append(
        CppExtension(
            "qcs_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    )

emulation_sources = sorted(glob.glob(str(CSRC / "emulation" / "*.cpp")))
if _env_flag("QCS_BUILD_EMULATION", "0") == "1" and emulation_sources:
    extensions.append(
        CppExtension(
            "qcs_ext._emulated",
            emulation_sources,
            include_dirs=include_dirs
            + [str((CSRC / "emulation").resolve()), str((CSRC / "cuda").resolve())],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-pthread", "-fvisibility=hidden"]},
            extra_link_args=["-pthread"],
        )
    )

BUILD_INFO = '''"""Written by setup.py when the native extension was built: the torch it was
built against (qcs_ext._native refuses to load the extension into another torch)."""

TORCH_VERSION = {torch!r}
TORCH_CUDA = {cuda!r}
WITH_CUDA = {with_cuda!r}
'''


class QcsBuildExt(BuildExtension.with_options(no_python_abi_suffix=True)):
    """torch's BuildExtension, then ``qcs_ext/_build_info.py`` beside the built ``_C``
    (in the build tree for a wheel, in the source tree for an in-place build)."""

    def run(self) -> None:
        super().run()
        target = Path(self.get_ext_fullpath("qcs_ext._C")).parent / "_build_info.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            BUILD_INFO.format(
                torch=str(torch.__version__), cuda=torch.version.cuda, with_cuda=build_cuda
            )
        )


setup(
    packages=["qcs_ext", *find_packages(where="python", include=["qcs", "qcs.*"])],
    package_dir={"qcs_ext": "qcs_ext", "qcs": "python/qcs"},
    package_data={
        "qcs": ["configs/*.toml", "py.typed"],
        "qcs_ext": ["py.typed"],
        "qcs.faces": ["weights/mtcnn.safetensors", "weights/NOTICE.md"],
    },
    ext_modules=extensions,
    cmdclass={"build_ext": QcsBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
