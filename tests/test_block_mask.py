"""asam_compile.kernels.block_mask: block masks built in row chunks equal torch's create_block_mask, block by block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    create_block_mask,
    create_mask,
    flex_attention,
)

from asam_compile.kernels import block_mask as bmod
from asam_compile.kernels.block_mask import build_block_mask

# One mask per factory, each with a readable __name__ (attention-gym style).


def causal():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal


def sliding_window(W):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    mask.__name__ = f"sliding_window_{W}"
    return mask


def document(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 90, (n,), generator=g)
    seg = torch.repeat_interleave(torch.arange(n), lengths)[:n]  # fixed segment ids, captured below

    def document(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    return document


def prefix_lm(P):
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx <= q_idx)

    mask.__name__ = f"prefix_lm_{P}"
    return mask


def chunked(C):
    def mask(b, h, q_idx, kv_idx):
        return q_idx // C == kv_idx // C

    mask.__name__ = f"chunked_{C}"
    return mask


def per_head_window():
    windows = torch.tensor([3, 40])

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    return per_head_window


def per_batch_length():
    lengths = torch.tensor([100, 17])

    def per_batch_length(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (q_idx >= kv_idx)

    return per_batch_length


MASKS = [causal(), sliding_window(7), sliding_window(64), document(), prefix_lm(50), chunked(40)]
SHAPES = [  # (L, S, block_size): ragged ends in q, kv or both, and an exact multiple
    (300, 300, 128),
    (200, 333, 128),
    (37, 37, 16),
    (37, 70, 16),
    (256, 256, 128),
]


def _reference(mask_mod, B, H, L, S, bs) -> BlockMask:
    return create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=bs)


def _dense(num, idx) -> torch.Tensor:
    """Which (q block, kv block) pairs a (num_blocks, indices) pair lists."""
    n = idx.shape[-1]
    used = torch.arange(n) < num[..., None]
    out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(used, idx, n).long(), True)
    return out[..., :n]


def assert_same_block_mask(ours: BlockMask, ref: BlockMask) -> None:
    assert ours.shape == ref.shape and ours.BLOCK_SIZE == ref.BLOCK_SIZE
    assert torch.equal(ours.to_dense(), ref.to_dense())
    # partial and full blocks separately, not only their union
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(_dense(ours.kv_num_blocks, ours.kv_indices), _dense(ref.kv_num_blocks, ref.kv_indices))
    assert torch.equal(
        _dense(ours.full_kv_num_blocks, ours.full_kv_indices), _dense(ref.full_kv_num_blocks, ref.full_kv_indices)
    )
    # the format, exactly: int32, full width, the same order (used blocks first, ascending)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype == torch.int32, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("L, S, bs", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("mask_mod", MASKS, ids=lambda m: m.__name__)
def test_equals_create_block_mask(mask_mod, L, S, bs):
    ref = _reference(mask_mod, 1, 1, L, S, bs)
    for chunk_elems in (1, 5000, 1 << 24):  # one query block per chunk, a few, everything at once
        ours, density = build_block_mask(mask_mod, 1, 1, L, S, "cpu", block_size=bs, chunk_elems=chunk_elems)
        assert_same_block_mask(ours, ref)
        assert density == pytest.approx(ref.to_dense().float().mean().item())
    assert ours.mask_mod is mask_mod and ours.seq_lengths == (L, S)


def test_ragged_blocks_are_partial_never_full():
    """Positions past L or S count as removed: a ragged block whose existing elements are all kept is partial."""
    ours, _ = build_block_mask(lambda b, h, q, kv: q >= 0, 1, 1, 37, 37, "cpu", block_size=16)
    full = _dense(ours.full_kv_num_blocks, ours.full_kv_indices)[0, 0]
    partial = _dense(ours.kv_num_blocks, ours.kv_indices)[0, 0]
    assert full[:2, :2].all() and not full[2].any() and not full[:, 2].any()
    assert partial[2].all() and partial[:, 2].all() and not partial[:2, :2].any()


@pytest.mark.parametrize("mask_mod, B, H", [(per_head_window(), 1, 2), (per_batch_length(), 2, 1), (causal(), 2, 3)],
                         ids=["per_head", "per_batch", "broadcast_causal"])
def test_batch_and_head_dims(mask_mod, B, H):
    ref = _reference(mask_mod, B, H, 150, 150, 32)
    ours, _ = build_block_mask(mask_mod, B, H, 150, 150, "cpu", block_size=32, chunk_elems=2000)
    assert_same_block_mask(ours, ref)


def test_cache():
    bmod.clear_cache()
    calls = []

    def counted(b, h, q_idx, kv_idx):
        calls.append(1)
        return q_idx >= kv_idx

    a = build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=16, key="causal")
    n = len(calls)
    assert build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=16, key="causal") is a
    assert len(calls) == n
    build_block_mask(counted, 1, 1, 80, 64, "cpu", block_size=16, key="causal")  # another length: evaluated
    build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=32, key="causal")  # another block size
    assert len(calls) == 3 * n
    build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=16)  # no key: never cached
    build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=16)
    assert len(calls) == 5 * n
    bmod.clear_cache()
    assert build_block_mask(counted, 1, 1, 64, 64, "cpu", block_size=16, key="causal") is not a


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_size=0"):
        build_block_mask(causal(), 1, 1, 8, 8, "cpu", block_size=0)
    with pytest.raises(ValueError, match="L=-1"):
        build_block_mask(causal(), 1, 1, -1, 8, "cpu")
    with pytest.raises(TypeError, match="bool"):
        build_block_mask(lambda b, h, q, kv: (q - kv).float(), 1, 1, 8, 8, "cpu")


def test_default_block_size_is_torchs():
    assert build_block_mask.__defaults__[0] == _DEFAULT_SPARSE_BLOCK_SIZE


# ------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    "mask_mod, L, S, bs",
    [(causal(), 300, 300, 128), (sliding_window(7), 200, 333, 128), (document(), 300, 300, 128), (chunked(40), 37, 37, 16)],
    ids=["causal-300", "sliding_window_7-200x333", "document-300", "chunked_40-37-bs16"],
)
def test_flex_attention_with_our_block_mask_matches_sdpa(mask_mod, L, S, bs):
    """Compiled FlexAttention (which skips empty blocks and mask_mod on full ones) vs SDPA with the dense mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (L, S, S))
    ours, _ = build_block_mask(mask_mod, 1, 1, L, S, "cpu", block_size=bs)
    out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=ours)
    dense = create_mask(mask_mod, 1, 1, L, S, device="cpu")
    assert dense.any(-1).all(), "every query keeps a key: no fully masked rows in these cases"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=dense).float()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
