"""Builds fastinfer's native extensions.

- ``fastinfer._C``: pybind11, no torch headers (block pool, step input preparation).
- ``fastinfer._C_cpu``: torch C++ extension with CPU kernels (added by the kernels work).
- CUDA sources are built only where torch has CUDA, ``nvcc`` exists and CUDA_HOME is known;
  ``FASTINFER_BUILD_CUDA=0/1`` overrides the guess.

See ../shared/BUILD_NOTES.md for the measured facts behind these choices.
"""
import os
import shutil

# torch guesses CUDA_HOME=/usr/local from the nvcc wrapper and then fails; point it at the
# real toolkit before torch.utils.cpp_extension is imported.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from pybind11.setup_helpers import Pybind11Extension  # noqa: E402
from setuptools import setup  # noqa: E402
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402


def native_core() -> Pybind11Extension:
    # Pybind11Extension mutates the flag list it is given: give it its own list.
    return Pybind11Extension(
        "fastinfer._C",
        ["csrc/step_input.cpp"],
        extra_compile_args=["-O3"],
        cxx_std=17,
    )


def native_cpu() -> CppExtension:
    # torch C++ extension: CPU kernels registered as torch.ops.fastinfer_cpu.* (its own flag
    # lists; never pass -std= to torch extensions). Portable flags only: the AVX-512 / AVX2
    # kernels use per-function target attributes and are picked at run time. -fopenmp makes
    # at::parallel_for use torch's OpenMP pool (torch ships and loads libgomp.so.1).
    # -ffp-contract=off: a multiply and an add stay two roundings in the functions built for
    # FMA targets too, so that every path does its numerical contract's operations exactly
    # (the SIMD paths' fmas are explicit intrinsics).
    return CppExtension(
        "fastinfer._C_cpu",
        ["csrc/cpu/linear_f32.cpp", "csrc/cpu/linear_q.cpp", "csrc/cpu/paged_attention.cpp",
         "csrc/cpu/kv_cache.cpp", "csrc/cpu/elementwise.cpp", "csrc/cpu/decoder.cpp"],
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    )


def build_cuda() -> bool:
    """FASTINFER_BUILD_CUDA=0/1 decides; otherwise build when torch has CUDA, nvcc exists and
    CUDA_HOME is a directory."""
    forced = os.environ.get("FASTINFER_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    cuda_home = os.environ.get("CUDA_HOME", "")
    return bool(torch.version.cuda) and shutil.which("nvcc") is not None and os.path.isdir(cuda_home)


def native_cuda():
    from torch.utils.cpp_extension import CUDAExtension

    # Without a GPU torch cannot guess the architectures and raises IndexError.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "fastinfer._C_cuda",
        ["csrc/cuda/bindings.cpp", "csrc/cuda/cache_kernels.cu", "csrc/cuda/attention_kernels.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )


ext_modules = [native_core(), native_cpu()] + ([native_cuda()] if build_cuda() else [])

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
