"""Masks read from runtime inputs (padding, caller-given position ids) become FlexAttention block masks built
inside the graph on every call (Note [Runtime masks as in-graph block masks] in passes/flex_plan.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile
from asam_compile.kernels import runtime
from asam_compile.kernels.block_mask import build_block_mask

from helpers import count_sdpa

FLEX = {"strict": True, "flex": "always", "block_size": 16}


def nodes_calling(graphs, target) -> list:
    return [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def small_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def padding(B, L, left=(), right=()):
    """A (B, L) HF attention_mask: 1 = token, 0 = padding; left[i] / right[i] padded tokens of row i."""
    am = torch.ones(B, L, dtype=torch.long)
    for i, n in enumerate(left):
        am[i, :n] = 0
    for i, n in enumerate(right):
        am[i, L - n:] = 0
    return am


def assert_matches(out, eager, ref):
    """The rewritten output equals eager (also on rows with no key left, where eager averages V) and is no
    worse than eager against float64 on the rows where float64 is finite (its finfo.min masks can overflow)."""
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=1e-4)
    ok = ~ref.isnan().any(-1, keepdim=True)
    assert ok.any()
    err = (out.double() - ref).where(ok, 0).abs().max().item()
    err_eager = (eager.double() - ref).where(ok, 0).abs().max().item()
    assert err <= 4 * err_eager + 1e-6, (err, err_eager)


def test_hf_llama_padding_builds_its_block_mask_in_the_graph():
    """Left and right padding in one batch: both layers run Flex with one in-graph block-mask build, and a
    second call with other padding reuses the graph (no recompile) and is still right."""
    model = small_llama()
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(0, 128, (3, 77))
    compiled = torch.compile(model, backend="asam", options=FLEX)
    with torch.no_grad(), asam_compile.capture() as cap:
        for am in (padding(3, 77, left=(0, 20), right=(0, 0, 9)), padding(3, 77, left=(50, 0, 76))):
            out = logits(compiled(input_ids=ids, attention_mask=am))
            assert_matches(out, logits(model(input_ids=ids, attention_mask=am)), logits(ref_model(input_ids=ids, attention_mask=am)))
    assert len(cap.graphs) == 1, "new padding values must not recompile"
    assert len(nodes_calling(cap.graphs, runtime.flex_attention_call)) == 2 and count_sdpa(cap.graphs) == 0
    assert len(nodes_calling(cap.graphs, runtime.block_mask_tensors_call)) == 1, "layers share one build"
    for cand in cap.report.rewritten:
        assert cand.target == "flex" and cand.info["mask"] == "flex:causal_with_attention_mask", cand.info
        assert "built in the graph from l_kwargs_attention_mask_" in cand.info["kernel"], cand.info


def test_hf_llama_packed_documents_from_caller_position_ids():
    """position_ids that restart (packed sequences, use_cache=False): transformers 5 turns them into a
    document mask from cumsum/diff of the runtime position_ids; its block mask is built in the graph."""
    model = small_llama()
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(0, 128, (2, 90))
    compiled = torch.compile(model, backend="asam", options=FLEX)
    with torch.no_grad(), asam_compile.capture() as cap:
        for docs in ((30, 60), (5, 40, 45)):
            pos = torch.cat([torch.arange(n) for n in docs])[None].expand(2, -1).contiguous()
            kw = dict(input_ids=ids, position_ids=pos, use_cache=False)
            out = logits(compiled(**kw))
            assert_matches(out, logits(model(**kw)), logits(ref_model(**kw)))
    assert len(cap.graphs) == 1
    assert len(nodes_calling(cap.graphs, runtime.flex_attention_call)) == 2
    assert all("with_packed_sequence_mask" in c.info["mask"] for c in cap.report.rewritten), cap.report


def test_hf_bert_padding_through_flex():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=128, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids, am = torch.randint(0, 128, (2, 70)), padding(2, 70, right=(0, 33))
    with torch.no_grad(), asam_compile.capture() as cap:
        out = logits(torch.compile(model, backend="asam", options=FLEX)(input_ids=ids, attention_mask=am))
        assert_matches(out, logits(model(input_ids=ids, attention_mask=am)),
                       logits(copy.deepcopy(model).double()(input_ids=ids, attention_mask=am)))
    assert len(nodes_calling(cap.graphs, runtime.flex_attention_call)) == 2, cap.report


def test_in_graph_block_tables_equal_the_dense_mask():
    """The tables block_mask_tensors_call builds keep exactly the positions of the dense causal & padding
    mask, for lengths that are not multiples of the block size, and say which rows have no key."""
    from torch.nn.attention.flex_attention import BlockMask

    from asam_compile.passes.lift import Capture

    for L, B, bs in ((37, 2, 16), (300, 3, 32), (64, 1, 16)):
        am = padding(B, L, left=(0, 7, 40)[:B], right=(5, 0, 0)[:B]).bool()
        holder = Capture(None, am, runtime=True)

        def keep_fn(b, h, q, kv):
            return (kv <= q) & holder.tensor[b, kv]

        runtime.register_mask_mod("test_pad", keep_fn)
        runtime.register_captures("test_pad", (holder,))
        other = padding(B, L, left=(3, 1, 2)[:B]).bool()  # the build must read its argument, not the holder
        tables = runtime.block_mask_tensors_call(
            other, mask_key="test_pad", batch_heads=(B, 1), seq_lengths=(L, L), block_size=bs, device=torch.device("cpu")
        )
        assert holder.tensor is am, "the capture is restored after the call"
        i = torch.arange(L)
        dense = (i[None, None, None, :] <= i[None, None, :, None]) & other[:, None, None, :]  # (B, 1, L, L)
        bm = BlockMask.from_kv_blocks(*tables[:4], BLOCK_SIZE=bs, seq_lengths=(L, L))
        blocks = bm.to_dense()  # (B, 1, nq, nk)
        computed = blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :L, :L].bool()
        holder.tensor = other
        got = computed & keep_fn(torch.arange(B)[:, None, None, None], 0, i[:, None], i[None, :])
        holder.tensor = am
        assert torch.equal(got, dense), (L, B, bs)
        assert torch.equal(tables[4], ~dense.any(-1, keepdim=True)), (L, B, bs)
        # and the same classification as the compile-time builder on the same values
        holder.tensor = other
        ref, _ = build_block_mask(keep_fn, B, 1, L, L, "cpu", block_size=bs)
        holder.tensor = am
        for a, b in zip(tables[:4], (ref.kv_num_blocks, ref.kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices)):
            assert torch.equal(a, b), (L, B, bs)


class KeyBias(nn.Module):
    """A per-key additive bias given at run time, with arbitrary values (not only 0 / a removed key)."""

    def forward(self, q, k, v, bias):
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias[:, None, None, :]
        return scores.softmax(-1) @ v


class KeyFill(nn.Module):
    """A (B, S) keep vector given at run time, applied with masked_fill(value)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], self.value)
        return F.softmax(scores, dim=-1) @ v


class CausalKeyFill(KeyFill):
    """Causal attention with a runtime (B, S) padding vector, masked_fill(value) on removed keys."""

    def forward(self, q, k, v, keep):
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.arange(S, device=q.device)[None, :] <= torch.arange(L, device=q.device)[:, None]
        scores = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float()
        scores = scores.masked_fill(~(causal & keep[:, None, None, :]), self.value)
        return F.softmax(scores, dim=-1).to(q.dtype) @ v


def qkv(B, L, H=2, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, E, generator=g) for _ in range(3)]


def test_runtime_bias_with_arbitrary_values_becomes_a_score_mod():
    q, k, v = qkv(2, 50)
    bias = torch.randn(2, 50)
    bias[1, 30:] = torch.finfo(torch.float32).min
    model = KeyBias()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=FLEX)(q, k, v, bias)
    (cand,) = cap.report.rewritten
    assert cand.target == "flex" and "score_mod" in cand.info["kernel"], cand.info
    assert_matches(out, model(q, k, v, bias), model(q.double(), k.double(), v.double(), bias.double()))


@pytest.mark.parametrize("value", [float("-inf"), torch.finfo(torch.float32).min])
def test_rows_left_without_keys_give_what_eager_gives(value):
    """Batch item 1 has no key at all: eager gives NaN with a -inf fill and the mean of V with a finite one."""
    q, k, v = qkv(2, 40)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :13] = False
    keep[1] = False
    model = KeyFill(value)
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=FLEX)(q, k, v, keep)
    assert cap.report.rewritten[0].target == "flex", cap.report
    eager = model(q, k, v, keep)
    assert torch.equal(out[1].isnan(), eager[1].isnan()) and eager[1].isnan().all() == (value == float("-inf"))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_runtime_mask_near_misses_keep_a_dense_mask_with_the_reason(monkeypatch):
    from asam_compile.passes import lift_graph

    q, k, v = qkv(2, 50)
    keep = torch.rand(2, 50) > 0.2
    model = KeyFill(float("-inf"))
    cases = [({"flex": "never"}, "flex='never'")]
    for options, why in cases:
        with torch.no_grad(), asam_compile.capture() as cap:
            torch.compile(model, backend="asam", options={**FLEX, **options})(q, k, v, keep)
        (cand,) = cap.report.rewritten
        assert cand.target == "sdpa" and cand.info["mask"] == "dense" and why in cand.info["kernel"], cand.info
    monkeypatch.setattr(lift_graph, "_SMALL_CONSTANT", 16)  # the (2, 50) keep vector is now "too big"
    torch._dynamo.reset()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=FLEX)(q, k, v, keep)
    (cand,) = cap.report.rewritten
    assert cand.target == "sdpa" and "too big" in cand.info["kernel"], cand.info
    torch.testing.assert_close(out, model(q, k, v, keep), atol=1e-5, rtol=1e-4, equal_nan=True)


class KeyFillDropout(KeyFill):
    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~keep[:, None, None, :], self.value)
        return F.dropout(F.softmax(scores, dim=-1), p=0.1, training=True) @ v


def test_runtime_mask_with_dropout_stays_on_sdpa():
    q, k, v = qkv(2, 50)
    with torch.no_grad(), asam_compile.capture() as cap:
        torch.compile(KeyFillDropout(float("-inf")), backend="asam", options=FLEX)(q, k, v, torch.rand(2, 50) > 0.2)
    (cand,) = cap.report.rewritten
    assert cand.target == "sdpa" and "dropout" in cand.info["kernel"], cand.info


def test_block_tables_op_copies_and_expands():
    """asam::block_tables (Note [Block tables leave the graph through an opaque op]) passes opcheck, expands
    broadcast tables to the call's (batch, heads) and never returns its input, even when it is full-size."""
    nq, nk = 3, 4
    small = [torch.zeros(1, 1, nq, dtype=torch.int32), torch.arange(nk, dtype=torch.int32).expand(1, 1, nq, nk).contiguous()] * 2
    full = [t.expand(2, 3, *t.shape[2:]).contiguous() for t in small]
    for tables in (small, full):
        torch.library.opcheck(torch.ops.asam.block_tables.default, (*tables, 2, 3))
        out = torch.ops.asam.block_tables(*tables, 2, 3)
        for a, b in zip(out, tables):
            assert a.shape[:2] == (2, 3) and a.is_contiguous() and a.data_ptr() != b.data_ptr()
            assert torch.equal(a, b.expand_as(a))


def test_runtime_mask_under_dynamic_shapes_keeps_a_dense_mask_and_matches_float64():
    """Near miss: a mask read from a run-time tensor in a dynamic-shape graph is not lifted (its captures would
    have symbolic shapes): SDPA with the dense mask, the reason in the report, numbers as eager's."""
    model = KeyFill(float("-inf"))
    compiled = torch.compile(model, backend="asam", options=FLEX, dynamic=True)
    with torch.no_grad(), asam_compile.capture() as cap:
        for L in (40, 57, 90):
            q, k, v = qkv(2, L, seed=L)
            keep = torch.rand(2, L, generator=torch.Generator().manual_seed(L)) > 0.3
            out = compiled(q, k, v, keep)
            ref = model(q.double(), k.double(), v.double(), keep)
            err, err_eager = (out.double() - ref).abs().max().item(), (model(q, k, v, keep).double() - ref).abs().max().item()
            assert err <= 4 * err_eager + 1e-6, (L, err, err_eager)
    assert len(nodes_calling(cap.graphs, runtime.flex_attention_call)) == 0
    assert cap.report.rewritten and all(
        c.target == "sdpa" and "dynamic shapes" in c.info["kernel"] for c in cap.report.rewritten), cap.report


# ------------------------------------------------------------------ adaptive sparse inside a structured mask


class MaskedAttention(nn.Module):
    """Hand-written GQA attention under a causal mask combined with a caller-given key padding vector
    ("padding": read at run time) or with a sliding window ("window": shapes only)."""

    def __init__(self, kind: str, window: int = 300) -> None:
        super().__init__()
        self.kind, self.window = kind, window

    def forward(self, q, k, v, keep):
        L, S = q.shape[-2], k.shape[-2]
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        i, j = torch.arange(L, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        mask = (j <= i)[None, None]
        mask = mask & keep[:, None, None, :] if self.kind == "padding" else mask & (i - j < self.window)
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v

    def dense_mask(self, keep, L, S):
        i, j = torch.arange(L, device=keep.device)[:, None], torch.arange(S, device=keep.device)[None, :]
        mask = (j <= i)[None, None]
        return mask & keep[:, None, None, :] if self.kind == "padding" else mask & (i - j < self.window)


def mask_blocks(mask, bs):
    """(allowed, partial) block sets of a bool (B, H, L, S) mask: blocks it keeps any of, and those it cuts."""
    L, S = mask.shape[-2:]
    QB, KB = -(-L // bs), -(-S // bs)
    counts = F.pad(mask.int(), (0, KB * bs - S, 0, QB * bs - L)).view(*mask.shape[:2], QB, bs, KB, bs).sum((3, 5))
    return counts > 0, (counts > 0) & (counts < bs * bs)


def adaptive_reference(model, q, k, v, keep, settings):
    """Float64 SDPA with the original mask restricted to the blocks the selection keeps inside it."""
    from asam_compile.kernels.selection import select_blocks

    bs, L, S = settings.block_size, q.shape[2], k.shape[2]
    mask = model.dense_mask(keep, L, S)
    allowed, partial = mask_blocks(mask, bs)
    kr, vr = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    rows = mask.diagonal(dim1=-2, dim2=-1)  # Note [Valid rows of a masked block]
    kept, _, allowed = select_blocks(q, kr, scale=q.shape[-1] ** -0.5, causal=False, settings=settings,
                                     blocks=(allowed, partial), valid=(rows, rows) if L == S else None)
    full = mask & kept.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :L, :S]
    scores = (q.double() @ kr.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    ref = torch.softmax(scores.masked_fill(~full, float("-inf")), -1) @ vr.double()
    return ref, float(kept.sum() / allowed.expand_as(kept).sum())


@pytest.mark.parametrize("kind", ["padding", "window"])
def test_adaptive_inside_a_structured_mask_equals_the_dense_reference(kind):
    """Note [Adaptive over a structured mask]: the selection runs inside the mask's block mask (built in the graph
    from the run-time padding vector, or at compile time for the window) and Flex computes exactly the kept
    blocks under the original mask; rows the mask leaves empty give what eager gives (NaN here)."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels.adaptive import adaptive_masked_call
    from test_adaptive import planted

    q, k, v = (x[:, :, :1000].contiguous() for x in planted(B=2, H=4, L=1024))
    k, v = k[:, ::2].contiguous(), v[:, ::2].contiguous()  # GQA: 2 kv heads
    keep = torch.ones(2, 1000, dtype=torch.bool)
    keep[1, :300] = False  # left padding of the second item: its first 300 query rows have no key
    model = MaskedAttention(kind, window=700)  # about 6 key blocks a row: room to skip some
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.5, "max_density": 1.0, "window": 1, "sinks": 1,
            "block_size": 128, "strict": True}
    torch._dynamo.reset()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=opts)(q, k, v, keep)
        eager = model(q, k, v, keep)
    [cand] = cap.report.candidates
    assert cand.target == "adaptive" and "inside the block mask of" in cand.info["adaptive"], cand.info
    assert cand.info["enable_gqa"] is True, cand.info
    assert len(nodes_calling(cap.graphs, adaptive_masked_call)) == 1
    ref, density = adaptive_reference(model, q, k, v, keep, SparseSettings(128, 0.5, 1.0, 0, 1, 1))
    assert density < 0.8, density
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isnan(), eager.isnan())
    torch.testing.assert_close(out.double().nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-4)
    assert (out - eager).nan_to_num().abs().max() > 1e-2  # it really is sparse


def test_adaptive_inside_padding_pools_only_the_valid_rows():
    """Note [Valid rows of a masked block]: padding keys that pull the pooled estimate of the block they share with
    the first real tokens (a forced block) would take a row's whole estimated mass; the compiled selection pools
    the valid rows only, so it keeps the block the padded item's queries really attend to, and equals the float64
    reference of that selection."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels.selection import select_blocks
    from test_adaptive import planted

    q, k, v = (x[:, :, :1000].contiguous() for x in planted(B=2, H=4, L=1024))
    keep = torch.ones(2, 1000, dtype=torch.bool)
    keep[1, :300] = False
    # the padding keys point where the padded item's queries do: block 2 (keys 256-383) looks all-important
    # unless its 44 padding keys are left out of its mean
    k[1, :, :300] += 3.0 * q[1, :, 300:].mean(1, keepdim=True)
    model = MaskedAttention("padding")
    st = SparseSettings(128, 0.9, 1.0, 0, 1, 1)
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.9, "max_density": 1.0, "window": 1, "sinks": 1,
            "block_size": 128, "strict": True}
    torch._dynamo.reset()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=opts)(q, k, v, keep)
    assert cap.report.candidates[0].target == "adaptive"
    ref, _ = adaptive_reference(model, q, k, v, keep, st)
    torch.testing.assert_close(out.double().nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-4)

    mask = model.dense_mask(keep, 1000, 1000)
    blocks = mask_blocks(mask, 128)
    rows = mask.diagonal(dim1=-2, dim2=-1)
    by_valid = select_blocks(q, k, scale=32**-0.5, causal=False, settings=st, blocks=blocks, valid=(rows, rows))[0]
    by_all = select_blocks(q, k, scale=32**-0.5, causal=False, settings=st, blocks=blocks)[0]
    probs = torch.softmax((q[1] @ k[1].transpose(-2, -1) * 32**-0.5).masked_fill(~mask[1], float("-inf")), -1)
    mass = F.pad(probs[:, 300:], (0, 24)).view(4, 700, 8, 128).sum(-1)  # true block mass of the real queries
    qb = torch.arange(300, 1000) // 128

    def kept_mass(kept):
        return (mass * kept[1][:, qb].float()).sum(-1)

    assert kept_mass(by_valid).min() > 0.85, kept_mass(by_valid).min()
    assert kept_mass(by_all).min() < 0.75, kept_mass(by_all).min()  # pooling the padding rows: 0.67


def test_hf_llama_left_padding_goes_adaptive_and_full_coverage_is_exact():
    """An HF Llama with a left-padded batch in adaptive mode: both layers go adaptive inside the padding mask
    built in the graph (one build), a second call with other padding reuses the graph, and at coverage 1.0
    the result equals eager, padded rows included."""
    from asam_compile.kernels.adaptive import adaptive_masked_call

    model = small_llama()
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(0, 128, (2, 77))
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 1.0, "block_size": 16, "strict": True}
    compiled = torch.compile(model, backend="asam", options=opts)
    with torch.no_grad(), asam_compile.capture() as cap:
        for am in (padding(2, 77, left=(0, 20)), padding(2, 77, left=(50, 0))):
            out = logits(compiled(input_ids=ids, attention_mask=am))
            assert_matches(out, logits(model(input_ids=ids, attention_mask=am)),
                           logits(ref_model(input_ids=ids, attention_mask=am)))
    assert len(cap.graphs) == 1, "new padding values must not recompile"
    assert len(nodes_calling(cap.graphs, adaptive_masked_call)) == 2
    assert len(nodes_calling(cap.graphs, runtime.block_mask_tensors_call)) == 1, "layers share one build"
    assert all(c.target == "adaptive" for c in cap.report.candidates), cap.report.candidates


@pytest.mark.parametrize("extra, needle", [
    ({"estimator": "sampled"}, "the sampled estimator takes no mask or a causal one"),
    ({"dense_fallback": True}, "dense_fallback='per_call' takes no mask or a causal one"),
    ({"flex": "never"}, "keeps a dense mask (flex='never')"),
])
def test_adaptive_near_misses_inside_a_mask_stay_exact_with_the_reason(extra, needle):
    q, k, v = qkv(2, 300, H=4)
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[0, 250:] = False
    model = MaskedAttention("padding")
    opts = {"mode": "adaptive", "min_seq_len": 0, "block_size": 64, "strict": True, **extra}
    torch._dynamo.reset()
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(model, backend="asam", options=opts)(q, k, v, keep)
    [cand] = cap.report.candidates
    assert cand.target != "adaptive" and needle in cand.info["adaptive"], cand.info
    torch.testing.assert_close(out, model(q, k, v, keep), atol=2e-5, rtol=1e-4)


def test_adaptive_inside_a_window_under_dynamic_shapes_is_one_graph():
    """A shape-only mask under dynamic shapes gets its block mask built in the graph per call's length; the
    adaptive selection runs inside it: one graph serves three lengths, exact at coverage 1.0."""
    model = MaskedAttention("window", window=200)
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 1.0, "block_size": 64, "strict": True}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", dynamic=True, options=opts)
    with torch.no_grad(), asam_compile.capture() as cap:
        for L in (300, 420, 511):
            q, k, v = qkv(1, L, H=4, seed=L)
            keep = torch.ones(1, L, dtype=torch.bool)
            torch.testing.assert_close(compiled(q, k, v, keep), model(q, k, v, keep), atol=2e-5, rtol=1e-4)
    assert len(cap.graphs) == 1
    assert all(c.target == "adaptive" and "sliding_window_200" in c.info["adaptive"] for c in cap.report.candidates)
