"""Masks read from runtime inputs (padding, caller-given position ids) become FlexAttention block masks built
inside the graph on every call (Note [Runtime masks as in-graph block masks] in passes/match.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile
from asam_compile import runtime
from asam_compile.block_mask import build_block_mask

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
    from asam_compile.passes import lift

    q, k, v = qkv(2, 50)
    keep = torch.rand(2, 50) > 0.2
    model = KeyFill(float("-inf"))
    cases = [({"flex": "never"}, "flex='never'")]
    for options, why in cases:
        with torch.no_grad(), asam_compile.capture() as cap:
            torch.compile(model, backend="asam", options={**FLEX, **options})(q, k, v, keep)
        (cand,) = cap.report.rewritten
        assert cand.target == "sdpa" and cand.info["mask"] == "dense" and why in cand.info["kernel"], cand.info
    monkeypatch.setattr(lift, "_SMALL_CONSTANT", 16)  # the (2, 50) keep vector is now "too big"
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
