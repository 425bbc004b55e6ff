"""Structured masks known at compile time become FlexAttention block masks (issue 3's first increment)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile
from asam_compile import runtime

from helpers import count_sdpa


def count_flex(graphs) -> int:
    return sum(
        1 for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target is runtime.flex_attention_call
    )


class HFSlidingWindow(nn.Module):
    """Sliding-window attention written the way HF transformers 5 builds Mistral's eager mask."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(L)[None, None, :, None]
        kv_idx = torch.arange(S)[None, None, None, :]
        keep = (kv_idx <= q_idx) & (kv_idx > q_idx - self.window)
        mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class ChunkedLocal(nn.Module):
    """Bidirectional attention inside fixed chunks, written with masked_fill(-inf)."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        same = (i[:, None] // self.chunk) == (i[None, :] // self.chunk)
        att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        att = att.masked_fill(~same, float("-inf"))
        return att.softmax(-1) @ v


def dense_keep(module, L):
    i = torch.arange(L)
    if isinstance(module, HFSlidingWindow):
        return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - module.window)
    return (i[:, None] // module.chunk) == (i[None, :] // module.chunk)


CASES = [
    ("sliding_window", lambda: HFSlidingWindow(48), 300),
    ("sliding_window_short", lambda: HFSlidingWindow(7), 37),
    ("chunked_local", lambda: ChunkedLocal(100), 333),
]


def qkv(L, H=2, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, E, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name,make,L", CASES, ids=[c[0] for c in CASES])
def test_structured_mask_becomes_flex_and_matches_float64(name, make, L):
    model = make()
    q, k, v = qkv(L)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    assert count_flex(cap.graphs) == 1 and count_sdpa(cap.graphs) == 0
    (cand,) = cap.report.candidates
    assert cand.status == "rewritten" and cand.target == "flex", cand
    assert cand.info["mask"].startswith("flex:")
    ref = model(q.double(), k.double(), v.double())
    err = (out.double() - ref).abs().max().item()
    err_eager = (model(q, k, v).double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)
    # no L x L mask is left in the graph handed to Inductor: the mask subgraph is gone
    (gm,) = cap.graphs
    assert not [n for n in gm.graph.nodes if n.target is torch.where], gm.code


@pytest.mark.parametrize("name,make,L", CASES, ids=[c[0] for c in CASES])
def test_block_mask_equals_original_dense_mask(name, make, L):
    """The BlockMask built at compile time keeps exactly the positions the original mask keeps."""
    from torch.nn.attention.flex_attention import BlockMask

    model = make()
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(*qkv(L))
    (gm,) = cap.graphs
    (call,) = [n for n in gm.graph.nodes if n.target is runtime.flex_attention_call]
    tensors = [getattr(gm, a.target) for a in call.args[3:7]]
    bm = BlockMask.from_kv_blocks(*tensors, BLOCK_SIZE=16, mask_mod=runtime.MASK_MODS[call.kwargs["mask_key"]], seq_lengths=(L, L))
    # dense keep-mask from the block structure and the mask_mod, position by position
    nb = (L + 15) // 16
    got = torch.zeros(L, L, dtype=torch.bool)
    dense_blocks = bm.to_dense()[0, 0]  # (q blocks, kv blocks): 1 where a block is computed
    i = torch.arange(L)
    mod_vals = bm.mask_mod(torch.tensor(0), torch.tensor(0), i[:, None], i[None, :])
    for qb in range(nb):
        for kb in range(nb):
            if dense_blocks[qb, kb]:
                got[qb * 16:(qb + 1) * 16, kb * 16:(kb + 1) * 16] = mod_vals[qb * 16:(qb + 1) * 16, kb * 16:(kb + 1) * 16]
    assert torch.equal(got, dense_keep(model, L))


def test_flex_never_keeps_dense_sdpa():
    model = HFSlidingWindow(48)
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(model, backend="asam", options={"strict": True, "flex": "never"})(*qkv(300))
    assert count_flex(cap.graphs) == 0 and count_sdpa(cap.graphs) == 1
    assert cap.report.rewritten[0].info["mask"] == "dense"


def test_auto_on_cpu_short_sequence_picks_sdpa_with_reason():
    model = HFSlidingWindow(48)
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(model, backend="asam", options={"strict": True})(*qkv(300))
    (cand,) = cap.report.rewritten
    assert cand.target == "sdpa" and cand.info["kernel"].startswith("sdpa:"), cand.info


def test_cpu_training_keeps_sdpa():
    """Compiled Flex has no backward on CPU: a site that needs gradients stays on SDPA, and grads match."""
    model = HFSlidingWindow(48)
    q, k, v = (t.requires_grad_() for t in qkv(300))
    with asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always"})(q, k, v)
    assert count_flex(cap.graphs) == 0 and count_sdpa(cap.graphs) == 1
    out.sum().backward()
    g = q.grad.clone()
    q.grad = None
    model(q, k, v).sum().backward()
    torch.testing.assert_close(g, q.grad, atol=1e-5, rtol=1e-4)


def test_hf_mistral_sliding_window_through_flex():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, sliding_window=24, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 77))
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(ids).logits
        ref = copy.deepcopy(model).double()(ids).logits
        eager = model(ids).logits
    assert count_flex(cap.graphs) == 2, cap.report
    assert all(c.info["enable_gqa"] for c in cap.report.rewritten)
    assert all("sliding_window_24" in c.info["mask"] for c in cap.report.rewritten), cap.report
    err, err_eager = (out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_liftable_masks_are_classified_without_materialising_them(monkeypatch):
    """With static shapes a liftable mask is classified from its lifted index functions in row chunks: the
    mask subgraph itself (an L x S tensor) is never run at compile time."""
    from asam_compile.passes import match

    def no_full_evaluation(*args, **kwargs):
        raise AssertionError("the mask subgraph was evaluated at full size")

    monkeypatch.setattr(match, "_evaluate", no_full_evaluation)
    for model, L, expect in ((HFSlidingWindow(48), 300, "flex:sliding_window_48"), (ChunkedLocal(100), 333, "flex:")):
        with torch.no_grad(), asam_compile.capture() as cap:
            torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(*qkv(L))
        (cand,) = cap.report.candidates
        assert cand.status == "rewritten" and cand.info["mask"].startswith(expect), cand
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, attn_implementation="eager")
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(transformers.LlamaForCausalLM(cfg).eval(), backend="asam", options={"strict": True})(torch.randint(0, 128, (1, 40)))
    assert [c.info["is_causal"] for c in cap.report.candidates] == [True]
