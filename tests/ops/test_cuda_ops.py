"""CUDA kernels: they compile wherever the toolchain exists; on a GPU they match the reference."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastinfer.ops import cuda_native, reference

TOOLCHAIN = bool(torch.version.cuda) and shutil.which("nvcc") is not None and os.path.isdir(
    os.environ.get("CUDA_HOME", "/usr/local/cuda"))


@pytest.mark.skipif(not TOOLCHAIN or os.environ.get("FASTINFER_BUILD_CUDA") == "0",
                    reason="no CUDA build of torch or no nvcc here")
def test_cuda_extension_was_built():
    assert cuda_native.built(), "fastinfer._C_cuda should have been compiled where nvcc and CUDA torch exist"


@pytest.mark.skipif(not cuda_native.available(), reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reshape_and_cache_matches_reference(dtype):
    torch.manual_seed(0)
    nb, bs, hkv, d, T = 7, 16, 3, 64, 37
    qkv = torch.randn(T, (9 + 2 * hkv) * d, device="cuda", dtype=dtype)
    key = qkv[:, 9 * d:(9 + hkv) * d].view(T, hkv, d)  # strided over tokens, like the model's split
    value = qkv[:, (9 + hkv) * d:].view(T, hkv, d)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    sentinel = torch.full((nb, bs, hkv, d), 7.0, device="cuda", dtype=dtype)
    k1, v1, k2, v2 = (sentinel.clone() for _ in range(4))
    cuda_native.reshape_and_cache(key, value, k1, v1, slots)
    reference.reshape_and_cache(key, value, k2, v2, slots)
    torch.testing.assert_close(k1, k2, rtol=0, atol=0)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
