"""Builds fastinfer's native extensions.

- ``fastinfer._C``: pybind11, no torch headers (block pool, step input preparation).
- ``fastinfer._C_cpu``: torch C++ extension with CPU kernels (added by the kernels work).
- CUDA sources are built only where torch has CUDA, ``nvcc`` exists and CUDA_HOME is known;
  ``FASTINFER_BUILD_CUDA=0/1`` overrides the guess.

See ../shared/BUILD_NOTES.md for the measured facts behind these choices.
"""
import os

# torch guesses CUDA_HOME=/usr/local from the nvcc wrapper and then fails; point it at the
# real toolkit before torch.utils.cpp_extension is imported.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from pybind11.setup_helpers import Pybind11Extension  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension  # noqa: E402


def native_core() -> Pybind11Extension:
    # Pybind11Extension mutates the flag list it is given: give it its own list.
    return Pybind11Extension(
        "fastinfer._C",
        ["csrc/block_pool.cpp"],
        extra_compile_args=["-O3"],
        cxx_std=17,
    )


ext_modules = [native_core()]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
