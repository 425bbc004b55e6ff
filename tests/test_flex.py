"""Structured masks known at compile time become FlexAttention block masks (issue 3's first increment)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile
from asam_compile.kernels import runtime

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


def small_mistral():
    """An HF Mistral from a config (window 24, GQA) and 77 token ids."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, sliding_window=24, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval(), torch.randint(0, 128, (1, 77))


def test_hf_mistral_sliding_window_through_flex():
    model, ids = small_mistral()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(ids).logits
        ref = copy.deepcopy(model).double()(ids).logits
        eager = model(ids).logits
    assert count_flex(cap.graphs) == 2, cap.report
    assert all(c.info["enable_gqa"] for c in cap.report.rewritten)
    assert all("sliding_window_24" in c.info["mask"] for c in cap.report.rewritten), cap.report
    err, err_eager = (out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_hf_mistral_without_cache_reads_its_packed_sequence_vector():
    """With use_cache=False, transformers 5.17 adds a packed-sequence mask made with cumsum/diff from the
    in-graph position_ids: a per-token vector evaluated once at compile time (Note [Small constants]) and
    read by index in the mask_mod, so the sliding window still goes to Flex and matches float64."""
    model, ids = small_mistral()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(
            ids, use_cache=False
        ).logits
        ref = copy.deepcopy(model).double()(ids, use_cache=False).logits
        eager = model(ids, use_cache=False).logits
    assert count_flex(cap.graphs) == 2, cap.report
    err, err_eager = (out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_liftable_masks_are_classified_without_materialising_them(monkeypatch):
    """With static shapes a liftable mask is classified from its lifted index functions in row chunks: the
    mask subgraph itself (an L x S tensor) is never run at compile time."""
    from asam_compile.passes import plan

    def no_full_evaluation(*args, **kwargs):
        raise AssertionError("the mask subgraph was evaluated at full size")

    monkeypatch.setattr(plan, "_evaluate", no_full_evaluation)
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


class SlidingWindowDropout(HFSlidingWindow):
    def forward(self, q, k, v):
        L = q.shape[-2]
        i = torch.arange(L)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        return F.dropout(probs, p=0.25, training=True) @ v


def test_training_dropout_stays_on_sdpa():
    """Flex has no attention dropout: a site with dropout in training keeps SDPA (with dropout_p)."""
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(SlidingWindowDropout(16), backend="asam", options={"strict": True, "flex": "always", "inductor": False})(*qkv(64))
    (cand,) = cap.report.rewritten
    assert cand.target == "sdpa" and cand.info["dropout_p"] == 0.25 and "dropout" in cand.info["kernel"], cand.info


class ThreeDWindow(nn.Module):
    """(B*H, L, E) bmm spelling with a local window."""

    def forward(self, q, k, v):
        L = q.shape[-2]
        i = torch.arange(L)
        far = (i[None, :] - i[:, None]).abs() > 5
        att = torch.bmm(q, k.transpose(1, 2)) * 0.25
        att = att.masked_fill(far, float("-inf"))
        return torch.bmm(att.softmax(-1), v)


def test_three_d_window_runs_flex_over_the_merged_batch_head_dim_and_matches_float64():
    """3-D (B*H, L, E) sites run as (1, B*H, L, E): the block mask's head dim is the merged one."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 45, 16, generator=g) for _ in range(3))
    model = ThreeDWindow()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    assert count_flex(cap.graphs) == 1 and count_sdpa(cap.graphs) == 0, cap.report
    assert cap.report.rewritten[0].info["mask"] == "flex:bidirectional_window_5", cap.report
    assert out.shape == (6, 45, 16)
    ref = model(q.double(), k.double(), v.double())
    err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v).double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


class TwoDWindow(nn.Module):
    """(L, E) attention with one head and no batch dim, windowed with masked_fill(-inf)."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[0])
        att = (q @ k.T) * q.shape[-1] ** -0.5
        return att.masked_fill((i[None, :] - i[:, None]).abs() > 5, float("-inf")).softmax(-1) @ v


def test_two_d_window_keeps_dense_sdpa_and_matches_float64():
    """Near miss of the 3-D case: 2-D sites are not sent to Flex; SDPA with the dense mask, reason reported."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(45, 16, generator=g) for _ in range(3))
    model = TwoDWindow()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    assert count_flex(cap.graphs) == 0 and count_sdpa(cap.graphs) == 1, cap.report
    assert "3-D and 4-D" in cap.report.rewritten[0].info["kernel"], cap.report
    ref = model(q.double(), k.double(), v.double())
    err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v).double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


class ThreeDKeyPadding(nn.Module):
    """(B*H, L, E) bmm spelling with a per-(batch*head) key padding vector given at run time."""

    def forward(self, q, k, v, keep):
        att = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
        att = att.masked_fill(~keep[:, None, :], float("-inf"))
        return torch.bmm(att.softmax(-1), v)


def test_three_d_runtime_padding_through_flex():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(6, 40, 16, generator=g) for _ in range(3))
    keep = torch.rand(6, 40, generator=g) > 0.3
    model = ThreeDKeyPadding()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v, keep)
    assert count_flex(cap.graphs) == 1, cap.report
    ref = model(q.double(), k.double(), v.double(), keep)
    err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v, keep).double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_autocast_bf16_flex_runs_in_bf16():
    model = HFSlidingWindow(24)
    q, k, v = qkv(96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
        eager = model(q, k, v)
    assert count_flex(cap.graphs) == 1
    assert out.dtype == eager.dtype == torch.bfloat16
    ref = model(q.double(), k.double(), v.double())
    err, err_eager = (out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 2 * err_eager + 1e-3, (err, err_eager)


class LocalWindow(nn.Module):
    """A window [q - left, q + right] written with masked_fill(-inf), optionally causal-clipped."""

    def __init__(self, left: int, right: int) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        d = i[None, :] - i[:, None]
        keep = (d >= -self.left) & (d <= self.right)
        att = (q @ k.mT) * q.shape[-1] ** -0.5
        return att.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _keep_from_plan(gm, L, block):
    """The dense keep-mask that the BlockMask and mask_mod of the one Flex call in `gm` compute."""
    from torch.nn.attention.flex_attention import BlockMask

    (call,) = [n for n in gm.graph.nodes if n.target is runtime.flex_attention_call]
    tensors = [getattr(gm, a.target) for a in call.args[3:7]]
    bm = BlockMask.from_kv_blocks(*tensors, BLOCK_SIZE=block, mask_mod=runtime.MASK_MODS[call.kwargs["mask_key"]], seq_lengths=(L, L))
    computed = bm.to_dense()[0, 0].repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :L].bool()
    i = torch.arange(L)
    return computed & bm.mask_mod(torch.tensor(0), torch.tensor(0), i[:, None], i[None, :])


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(L=st.integers(17, 160), left=st.integers(0, 40), right=st.integers(0, 40), block=st.sampled_from([16, 32]))
def test_property_window_block_mask_is_exact(L, left, right, block):
    """Random windows and lengths: the compiled plan keeps exactly the positions the original mask keeps."""
    torch._dynamo.reset()
    model = LocalWindow(left, right)
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": block, "inductor": False})(*qkv(L, E=16))
    i = torch.arange(L)
    d = i[None, :] - i[:, None]
    expected = (d >= -left) & (d <= right)
    (cand,) = cap.report.candidates
    if bool(expected.all()):
        assert cand.info["mask"] == "none"
        return
    if torch.equal(expected, torch.ones(L, L, dtype=torch.bool).tril()):
        assert cand.info["is_causal"] is True  # a window reaching back over the whole sequence is causal
        return
    assert cand.target == "flex", cand
    assert torch.equal(_keep_from_plan(cap.graphs[0], L, block), expected)


def test_dynamic_shapes_structured_mask_builds_its_block_mask_in_the_graph():
    """dynamic=True: one graph serves several lengths (Note [Flex under dynamic shapes]); the sliding window
    goes to Flex with its block mask built in the graph for each call's length, and matches float64."""
    model = HFSlidingWindow(24)
    compiled = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16}, dynamic=True)
    with torch.no_grad(), asam_compile.capture() as cap:
        for L in (40, 77, 130):
            q, k, v = qkv(L, seed=L)
            out = compiled(q, k, v)
            ref = model(q.double(), k.double(), v.double())
            err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v).double() - ref).abs().max().item()
            assert err <= 4 * err_eager + 1e-6, (L, err, err_eager)
    assert 1 <= len(cap.graphs) <= 2, "dynamic=True should not recompile for every length"
    assert count_flex(cap.graphs) == len(cap.graphs)
    assert all(any(n.target is runtime.block_mask_tensors_call for n in gm.graph.nodes) for gm in cap.graphs)
    assert all(c.target == "flex" and "dynamic shapes" in c.info["kernel"] for c in cap.report.rewritten), cap.report


def test_dynamic_shapes_hf_mistral_window_through_flex():
    """An HF Mistral (window 24) compiled with dynamic=True, at three lengths: Flex at every site, one graph."""
    model, _ = small_mistral()
    compiled = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16}, dynamic=True)
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad(), asam_compile.capture() as cap:
        for L in (50, 77, 140):
            ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(L))
            out, eager, ref = compiled(ids).logits, model(ids).logits, ref_model(ids).logits
            err, err_eager = (out.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
            assert err <= 4 * err_eager + 1e-6, (L, err, err_eager)
    assert len(cap.graphs) <= 2, cap.report
    assert all(c.target == "flex" for c in cap.report.rewritten) and cap.report.rewritten, cap.report


def test_inductor_failure_on_flex_retries_with_dense_sdpa(monkeypatch):
    """If Inductor cannot compile a graph with our Flex call, the backend warns and compiles the SDPA
    (dense mask) rewrite instead of the original graph."""
    from asam_compile import _compat

    real = _compat.compile_fx

    def fails_on_flex(gm, *args, **kwargs):
        if any(n.target is runtime.flex_attention_call for n in gm.graph.nodes):
            raise RuntimeError("injected Flex lowering failure")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(_compat, "compile_fx", fails_on_flex)
    model = HFSlidingWindow(48)
    q, k, v = qkv(300)
    with torch.no_grad(), asam_compile.capture() as cap, pytest.warns(RuntimeWarning, match="flex='never'"):
        out = torch.compile(model, backend="asam", options={"flex": "always", "block_size": 16})(q, k, v)
    ref = model(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 1e-5
    report = cap.reports[-1]
    assert report.inductor_fallback and "injected" in report.inductor_fallback
    assert [c.target for c in report.rewritten] == ["sdpa"]


class ALiBiCausal(nn.Module):
    """ALiBi: a per-head linear bias of the key distance, from a slopes buffer, plus a causal mask."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]))

    def forward(self, q, k, v):
        L = q.shape[-2]
        i = torch.arange(L)
        dist = (i[None, :] - i[:, None]).float()  # kv - q, <= 0 on kept positions
        bias = self.slopes[:, None, None] * dist[None]
        causal = torch.triu(torch.full((L, L), float("-inf")), 1)
        att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias + causal
        return att.softmax(-1) @ v


class ALiBiCausalInline(ALiBiCausal):
    """ALiBi with the slopes computed in forward from the head count (no buffer)."""

    def forward(self, q, k, v):
        H, L = q.shape[1], q.shape[-2]
        slopes = torch.exp2(-8.0 * (torch.arange(H) + 1) / H)
        i = torch.arange(L)
        bias = slopes[:, None, None] * (i[None, :] - i[:, None])[None]
        causal = torch.triu(torch.full((L, L), float("-inf")), 1)
        att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias + causal
        return att.softmax(-1) @ v


def test_alibi_bias_becomes_a_flex_score_mod_and_matches_float64():
    model = ALiBiCausalInline(heads=2)
    q, k, v = qkv(150)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    (cand,) = cap.report.candidates
    assert cand.target == "flex" and cand.info.get("score_mod") == "lifted_bias", cand
    assert count_flex(cap.graphs) == 1
    ref = model(q.double(), k.double(), v.double())
    err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v).double() - ref).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_alibi_from_a_buffer_becomes_a_score_mod_reading_the_buffer():
    """Note [Captured tensors in Flex]: slopes kept in a module buffer reach the score_mod as a graph input."""
    model = ALiBiCausal(heads=2)
    q, k, v = qkv(150)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    (cand,) = cap.report.candidates
    assert cand.target == "flex" and cand.info.get("score_mod") == "lifted_bias", cand
    (call,) = [n for gm in cap.graphs for n in gm.graph.nodes if n.target is runtime.flex_attention_call]
    assert len(call.args) == 8, "q, k, v, four block-mask tensors and the slopes buffer"
    ref = copy.deepcopy(model).double()(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() <= 4 * (model(q, k, v).double() - ref).abs().max().item() + 1e-6


class BufferWindow(nn.Module):
    """A non-causal local window kept in a module buffer and sliced, nanoGPT style."""

    def __init__(self, T: int = 256, left: int = 9) -> None:
        super().__init__()
        i = torch.arange(T)
        self.register_buffer("window", ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - left)).view(1, 1, T, T))

    def forward(self, q, k, v):
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        att = att.masked_fill(~self.window[:, :, :T, :T], float("-inf"))
        return att.softmax(-1) @ v


def test_buffer_window_through_flex_matches_float64():
    model = BufferWindow()
    q, k, v = qkv(200)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always", "block_size": 16})(q, k, v)
    assert count_flex(cap.graphs) == 1, cap.report
    ref = copy.deepcopy(model).double()(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() <= 4 * (model(q, k, v).double() - ref).abs().max().item() + 1e-6


def test_alibi_with_flex_never_is_a_dense_sdpa_mask():
    model = ALiBiCausal(heads=2)
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(model, backend="asam", options={"strict": True, "flex": "never"})(*qkv(64))
    (cand,) = cap.report.candidates
    assert cand.target == "sdpa" and cand.info["mask"] == "dense"


def test_mask_that_cannot_be_evaluated_keeps_dense_sdpa_with_row_fixup(monkeypatch):
    """If the compile-time mask analysis fails, the site keeps a dense SDPA mask with the run-time
    fully-masked-row fix-up (never Flex, whose empty rows would differ from the original's)."""
    from asam_compile.passes import plan

    def broken(*args, **kwargs):
        raise RuntimeError("injected classification failure")

    monkeypatch.setattr(plan, "_classify_mask", broken)
    model = HFSlidingWindow(48)
    q, k, v = qkv(300)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options={"strict": True, "flex": "always"})(q, k, v)
    (cand,) = cap.report.rewritten
    assert cand.target == "sdpa" and cand.info["mask"] == "dense", cand.info
    (gm,) = cap.graphs
    assert any(n.target is torch.isneginf for n in gm.graph.nodes), "the run-time row fix-up is missing"
    ref = model(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() <= 4 * (model(q, k, v).double() - ref).abs().max().item() + 1e-6
