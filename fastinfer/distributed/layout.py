"""How a Llama-family model is split across ``size`` tensor-parallel ranks (Megatron's split):

- attention by KV head: each rank holds whole GQA groups (a KV head and the query heads that
  read it), so ``qkv`` is column-parallel and ``o_proj`` row-parallel over the rank's heads;
  when the ranks outnumber the KV heads, each KV head is replicated on ``size / num_kv_heads``
  ranks and its query group split between them (vLLM's way); when neither divides the other,
  whole groups are dealt out unevenly, the larger shares to the higher ranks (rank 0 also
  samples);
- the MLP by intermediate channel: ``gate_up`` column-parallel, ``down`` row-parallel, the split
  aligned to ``align`` inputs (the quantization group of ``down``'s inputs);
- the vocabulary: the embedding and the LM head each hold a contiguous range of token ids.

A rank's outputs of ``o_proj`` and ``down`` are partial sums, all-reduced across the ranks. This
module is plain arithmetic on the model's sizes: no tensor, no process group.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastinfer.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TPLayout:
    """What rank ``rank`` of ``size`` holds: half-open ranges ``(start, stop)`` of the query heads,
    the KV heads, the MLP's intermediate channels and the vocabulary."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def plan_layout(num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int, size: int,
                align: int = 32) -> list[TPLayout]:
    """The layout of every rank. Raises ``ConfigError`` (argument ``tensor_parallel_size``)
    when the model cannot be split ``size`` ways: more ranks than query heads, ranks that
    neither divide nor are divided by the KV heads while outnumbering them, or an intermediate
    size that ``align``-sized pieces cannot share."""
    if size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {size}", "tensor_parallel_size")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads' groups",
                          "tensor_parallel_size")
    heads = _head_ranges(num_heads, num_kv_heads, size)
    inter = _aligned_ranges(intermediate_size, size, align)
    vocab = _even_ranges(vocab_size, size)
    return [TPLayout(r, size, q, kv, inter[r], vocab[r]) for r, (q, kv) in enumerate(heads)]


def _head_ranges(num_heads: int, num_kv_heads: int, size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(query heads, KV heads) of each rank."""
    group = num_heads // num_kv_heads  # query heads per KV head
    if size > num_heads:
        raise ConfigError(f"tensor_parallel_size {size} exceeds the model's {num_heads} attention heads",
                          "tensor_parallel_size")
    if size > num_kv_heads:
        if size % num_kv_heads or group % (size // num_kv_heads):
            raise ConfigError(f"tensor_parallel_size {size} cannot share {num_kv_heads} KV heads (of {group} query "
                              f"heads each): use a divisor or a multiple of {num_kv_heads}", "tensor_parallel_size")
        per_q = num_heads // size
        reps = size // num_kv_heads  # ranks that hold a copy of each KV head
        return [((r * per_q, (r + 1) * per_q), (r // reps, r // reps + 1)) for r in range(size)]
    kv = _even_ranges(num_kv_heads, size, larger_last=True)
    return [((a * group, b * group), (a, b)) for a, b in kv]


def _even_ranges(total: int, size: int, larger_last: bool = False) -> list[tuple[int, int]]:
    """``total`` items in ``size`` contiguous ranges whose lengths differ by one at most (the
    longer ones first, or last with ``larger_last``)."""
    base, extra = divmod(total, size)
    lengths = [base + (1 if (r >= size - extra if larger_last else r < extra) else 0) for r in range(size)]
    starts = [sum(lengths[:r]) for r in range(size)]
    return [(s, s + n) for s, n in zip(starts, lengths)]


def _aligned_ranges(total: int, size: int, align: int) -> list[tuple[int, int]]:
    """``total`` channels in ``size`` ranges of whole ``align``-sized pieces."""
    if total % align or total // align < size:
        raise ConfigError(f"the MLP's {total} intermediate channels cannot be split {size} ways in pieces of "
                          f"{align} (the quantization group)", "tensor_parallel_size")
    return [(a * align, b * align) for a, b in _even_ranges(total // align, size)]
