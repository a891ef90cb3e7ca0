"""GGUF blocks kept quantized: every supported block type converts into the packed layout so
that ``code * scale + offset`` equals ``gguf``'s own dequantization bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from fastinfer.model import gguf_loader
from fastinfer.quant.gguf_blocks import KEPT_TYPES, to_packed

# bytes per block and the offsets of its fp16 fields (random bytes there could be inf/nan)
LAYOUT = {
    "Q8_0": (34, 32, [0]), "Q4_0": (18, 32, [0]), "Q4_1": (20, 32, [0, 2]), "Q5_0": (22, 32, [0]),
    "Q5_1": (24, 32, [0, 2]), "Q2_K": (84, 256, [80, 82]), "Q3_K": (110, 256, [108]),
    "Q4_K": (144, 256, [0, 2]), "Q5_K": (176, 256, [0, 2]), "Q6_K": (210, 256, [208]),
}


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes for ``rows x cols`` weights of ``type_name`` with finite fp16 fields."""
    block_bytes, block_elems, halves = LAYOUT[type_name]
    rng = np.random.default_rng(seed)
    nb = rows * cols // block_elems
    raw = rng.integers(0, 256, (nb, block_bytes), dtype=np.uint8)
    for off in halves:
        d = (rng.standard_normal(nb) * 0.02).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


HALF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def test_every_kept_type_is_covered():
    assert set(LAYOUT) == KEPT_TYPES
    assert KEPT_TYPES <= gguf_loader.SUPPORTED_TYPES


@pytest.mark.parametrize("type_name", sorted(KEPT_TYPES))
@pytest.mark.parametrize("rows,cols", [(1, 256), (5, 512), (3, 1536)])
def test_kept_blocks_equal_gguf_dequantization(type_name, rows, cols):
    raw = random_blocks(type_name, rows, cols, seed=rows * 7 + cols)
    want = dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32)
    packed = to_packed(type_name, raw, rows, cols)
    assert packed.shape == (rows, cols)
    assert packed.kind == ("u4" if type_name in ("Q4_0", "Q4_1", "Q4_K") else "s8")
    np.testing.assert_array_equal(packed.dequantize().numpy(), want)
    # the packed form is smaller than float32 and near the file's own size
    assert packed.nbytes < rows * cols * 4
    # types whose fp16 fields are the scale and offset keep them as float16, as the file has them
    if type_name in HALF_TYPES:
        assert packed.scales.dtype == torch.float16


def test_default_model_tensors_kept_exactly(smollm_path):
    """The real file: its Q8_0 embedding and Q4_1 projections, packed, dequantize to what gguf gives."""
    reader = gguf_loader.open_gguf(smollm_path)
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name not in KEPT_TYPES or t.name not in ("token_embd.weight", "blk.0.ffn_down.weight",
                                                                  "blk.3.attn_v.weight"):
            continue
        rows, cols = (int(d) for d in reversed(t.shape))
        want = dequantize(t.data, t.tensor_type).reshape(rows, cols)
        packed = to_packed(t.tensor_type.name, t.data, rows, cols)
        np.testing.assert_array_equal(packed.dequantize().numpy(), want)
        assert packed.scales.dtype == torch.float16  # Q8_0 and Q4_1: 2-byte scales and offsets, as in the file
        checked += 1
    assert checked == 3


def test_bad_block_data_is_refused():
    raw = random_blocks("Q4_0", 2, 64, seed=1)
    with pytest.raises(ValueError, match="not whole 32-weight blocks"):
        to_packed("Q4_0", raw, 2, 48)
    with pytest.raises(ValueError, match="holds 4 blocks, expected 6"):
        to_packed("Q4_0", raw, 3, 64)


def test_rope_rows_are_unpermuted_like_the_float_path(smollm_path):
    """Kept Q/K weights have their rows in the rotate-half order of the dequantized path."""
    reader = gguf_loader.open_gguf(smollm_path)
    kept = gguf_loader.load_gguf_tensors(reader, 9, 3, keep_quantized=True)
    floats = gguf_loader.load_gguf_tensors(reader, 9, 3, keep_quantized=False)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        torch.testing.assert_close(kept[name].dequantize(), floats[name], rtol=0, atol=0)
    assert isinstance(floats["model.norm.weight"], torch.Tensor) and not isinstance(kept["model.norm.weight"],
                                                                                    torch.nn.Module)
