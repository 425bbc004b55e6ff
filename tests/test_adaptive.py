"""ASAM adaptive sparse mode (issue 4): opt-in, per input and per head, on FlexAttention block masks.

CPU: compiled Flex runs inference here, so numerics are checked without gradients; training is in
tests/test_gpu.py.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asam_compile
from asam_compile.kernels import adaptive, selection
from asam_compile.config import SparseSettings
from asam_compile.kernels.selection import select_blocks
from zoo import SlidingWindowCausal  # Gemma-3's local layers

BS = 128
EXACT_TOL = 2e-5  # float32, compiled Flex vs SDPA on the same blocks


def count_adaptive(graphs) -> int:
    return sum(
        1 for gm in graphs for n in gm.graph.nodes
        if n.op == "call_function" and adaptive.is_adaptive_call(n)
    )


class CausalAttention(nn.Module):
    """nanoGPT-style causal attention over given q, k, v (GQA by repeat_interleave when k has fewer heads)."""

    def forward(self, q, k, v):
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        L = q.shape[-2]
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        return F.softmax(s, dim=-1) @ v


class FullAttention(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CausalAttention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, q, k, v):
        return self.layers[0](q, k, v) + self.layers[1](q, k, v)


def qkv(B=1, H=4, Hkv=None, L=1000, E=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    return (torch.randn(B, H, L, E, generator=g), torch.randn(B, Hkv, L, E, generator=g),
            torch.randn(B, Hkv, L, E, generator=g))


def planted(B=1, H=2, L=2048, E=32, seed=0):
    """q/k where each query block attends (strongly) to one far key block besides its own: real-looking
    concentrated attention whose important blocks an estimate has to find."""
    g = torch.Generator().manual_seed(seed)
    n = L // BS
    q = 0.3 * torch.randn(B, H, L, E, generator=g)
    k = 0.3 * torch.randn(B, H, L, E, generator=g)
    v = torch.randn(B, H, L, E, generator=g)
    for i in range(2, n):
        j = (i * 7 + 3) % (i - 1)  # a block well before the diagonal
        d = torch.randn(B, H, 1, E, generator=g)
        d = d / d.norm(dim=-1, keepdim=True) * 6.0
        q[:, :, i * BS:(i + 1) * BS] += d
        k[:, :, j * BS:(j + 1) * BS] += d
    return q, k, v


def compile_adaptive(model, inputs, **options):
    opts = {"mode": "adaptive", "min_seq_len": 0, "strict": True, **options}
    torch._dynamo.reset()
    with asam_compile.capture() as cap, torch.no_grad():
        out = torch.compile(model, backend="asam", options=opts, fullgraph=True)(*inputs)
    return out, cap


def exact(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# ------------------------------------------------------------------------------------------ block selection


def test_selection_keeps_forced_blocks_and_stays_inside_the_mask():
    q, k, _ = qkv(L=1000, H=3)
    st = SparseSettings(BS, coverage=0.3, max_density=1.0, min_seq_len=0, window=2, sinks=1)
    kept, partial, allowed = select_blocks(q, k, scale=32**-0.5, causal=True, settings=st)
    QB = -(-1000 // BS)
    assert kept.shape == (1, 3, QB, QB)
    assert not (kept & ~allowed).any(), "a kept block the causal mask forbids"
    assert torch.equal(allowed[0, 0], torch.ones(QB, QB, dtype=torch.bool).tril())
    assert torch.equal(partial[0, 0], torch.eye(QB, dtype=torch.bool))
    for i in range(QB):
        assert kept[..., i, 0].all(), "sink block dropped"
        assert kept[..., i, i].all(), "diagonal block dropped"
        if i:
            assert kept[..., i, i - 1].all(), "window block dropped"


def test_selection_is_per_head_and_finds_planted_blocks():
    q, k, _ = planted(H=2, L=2048)
    st = SparseSettings(BS, coverage=0.9, max_density=1.0, min_seq_len=0, window=1, sinks=0)
    kept, _, allowed = select_blocks(q, k, scale=32**-0.5, causal=True, settings=st)
    for i in range(2, 2048 // BS):
        j = (i * 7 + 3) % (i - 1)
        assert kept[0, :, i, j].all(), f"query block {i}: planted key block {j} not kept"
    assert selection.block_density(kept, allowed) < 0.6
    # a different input selects differently: the choice is per input, not fixed at compile time
    kept2, _, _ = select_blocks(*planted(H=2, L=2048, seed=1)[:2], scale=32**-0.5, causal=True, settings=st)
    assert not torch.equal(kept, kept2)


def test_diffuse_heads_fall_back_to_all_blocks():
    q, k, _ = qkv(L=1024, H=2)
    q[:, 1] *= 0  # head 1: uniform attention, the estimate is flat
    st = SparseSettings(BS, coverage=0.9, max_density=0.5, min_seq_len=0, window=1, sinks=0)
    kept, _, allowed = select_blocks(q, k, scale=32**-0.5, causal=True, settings=st)
    assert torch.equal(kept[0, 1], allowed[0, 1]), "a diffuse head must run all its blocks (exact)"


# ------------------------------------------------------------------------------------- compiled numerics


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_full_coverage_is_exact(causal):
    """coverage=1 keeps every block with any estimated mass: the result is exact attention."""
    model = CausalAttention() if causal else FullAttention()
    inputs = qkv(L=1000, H=4, Hkv=2 if causal else None)
    out, cap = compile_adaptive(model, inputs, coverage=1.0, max_density=1.0)
    assert count_adaptive(cap.graphs) == 1
    (cand,) = cap.report.candidates
    assert cand.status == "rewritten" and cand.target == "adaptive", cand.info
    assert cand.info["enable_gqa"] is causal
    torch.testing.assert_close(out, exact(model, inputs), atol=EXACT_TOL, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (1, 4, 33, 33)])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.7, 1.0])
def test_block_index_tables_equal_a_stable_descending_argsort(shape, p):
    """_indices (running counts and a scatter, no sort) gives each row's kept blocks first, each group in order:
    exactly what a stable descending argsort of the row gives, eager and compiled."""
    blocks = torch.rand(shape, generator=torch.Generator().manual_seed(shape[-1])) < p
    expected = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    for fn in (selection.block_tables, torch.compile(selection.block_tables, dynamic=False)):
        num, idx = fn(blocks)
        assert num.dtype == idx.dtype == torch.int32
        assert torch.equal(num, blocks.sum(-1, dtype=torch.int32))
        assert torch.equal(idx, expected)


def test_inference_graphs_skip_the_q_side_block_tables(monkeypatch):
    """Flex's q-side tables serve only its backward: a no_grad adaptive graph does not ask for them."""
    from torch.nn.attention.flex_attention import BlockMask

    asked = []
    original = BlockMask.from_kv_blocks.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("compute_q_blocks", True))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(BlockMask, "from_kv_blocks", classmethod(spy))
    out, _ = compile_adaptive(CausalAttention(), qkv(L=1000, H=4, Hkv=2), coverage=0.3, max_density=1.0, window=1,
                              sinks=1)
    assert asked and not any(asked), asked
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("L", [1000, 1500])
def test_compiled_flex_equals_dense_reference_on_the_kept_blocks(L):
    """At low coverage the compiled block-sparse kernel computes exactly softmax over the kept blocks."""
    inputs = qkv(L=L, H=4, Hkv=2)
    out, _ = compile_adaptive(CausalAttention(), inputs, coverage=0.3, max_density=1.0, window=1, sinks=1)
    st = SparseSettings(BS, 0.3, 1.0, 0, 1, 1)
    ref, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=st)
    assert density < 0.9, density
    torch.testing.assert_close(out, ref, atol=EXACT_TOL, rtol=1e-4)
    assert (out - exact(CausalAttention(), inputs)).abs().max() > 1e-2  # it really is sparse


def test_concentrated_attention_is_accurate_at_low_density():
    inputs = planted(H=2, L=2048)
    model = CausalAttention()
    out, _ = compile_adaptive(model, inputs, coverage=0.95, max_density=1.0, window=1, sinks=0)
    st = SparseSettings(BS, 0.95, 1.0, 0, 1, 0)
    _, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=st)
    ref = exact(model, inputs)
    err = ((out - ref).norm() / ref.norm()).item()
    # the local window alone (coverage too low to add any block) misses the planted blocks
    local, _ = compile_adaptive(model, inputs, coverage=1e-6, max_density=1.0, window=1, sinks=0)
    err_local = ((local - ref).norm() / ref.norm()).item()
    assert density < 0.5 and err < 0.05 and err_local > 4 * err, (density, err, err_local)


def mixed_heads(B=2, L=2048):
    """Planted (concentrated) heads 0, 1 and uniform heads 2, 3 (q = 0: a flat estimate), with GQA (2 kv heads
    of 2 query heads each) and a batch of 2 whose second item swaps the kinds: the max_density rule then sends
    a different set of (batch, head) pairs to exact attention in each batch item."""
    q, k, v = planted(B=B, H=2, L=L)
    q = q.repeat_interleave(2, dim=1) + 0.1 * torch.randn(B, 4, L, q.shape[-1], generator=torch.Generator().manual_seed(1))
    q[0, 2:] = 0
    q[1, :2] = 0
    return q, k, v


def test_dense_fallback_runs_diffuse_pairs_in_sdpa_and_the_others_sparse():
    """Note [Adaptive attention op], dense_fallback=True: the (batch, head) pairs above max_density run SDPA (exact), the others
    Flex on their kept blocks; together they equal the dense reference whose diffuse pairs keep every block."""
    inputs = mixed_heads()
    st = SparseSettings(BS, 0.8, 0.5, 0, 1, 1)
    _, _, _, dense = selection.select(*inputs[:2], scale=32**-0.5, causal=True, settings=st)
    assert dense.tolist() == [[False, False, True, True], [True, True, False, False]], dense
    out, cap = compile_adaptive(CausalAttention(), inputs, coverage=0.8, max_density=0.5, window=1, sinks=1,
                                dense_fallback=True)
    assert [n.target for gm in cap.graphs for n in gm.graph.nodes if adaptive.is_adaptive_call(n)] == [
        torch.ops.asam.adaptive_attention.default]
    assert cap.report.candidates[0].info["adaptive"].endswith("dense_fallback=per_call")
    ref, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=st)
    torch.testing.assert_close(out, ref, atol=EXACT_TOL, rtol=1e-4)
    full = exact(CausalAttention(), inputs)
    torch.testing.assert_close(out[0, 2:], full[0, 2:], atol=EXACT_TOL, rtol=1e-4)  # exact pairs
    torch.testing.assert_close(out[1, :2], full[1, :2], atol=EXACT_TOL, rtol=1e-4)
    assert (out[0, :2] - full[0, :2]).abs().max() > 1e-3, "the concentrated pairs should have been sparse"
    assert density < 0.8, density


def test_all_pairs_diffuse_is_plain_sdpa():
    inputs = qkv(L=1000, H=4, Hkv=2)
    out = torch.ops.asam.adaptive_attention(*inputs, 32**-0.5, True, BS, 0.9, 0.0, 1, 1)  # max_density 0: all
    torch.testing.assert_close(out, exact(CausalAttention(), inputs), atol=EXACT_TOL, rtol=1e-4)
    assert out.is_contiguous()


def test_op_gradients_on_the_exact_path():
    """The op's backward (recompute, then autograd) on CPU where every pair is exact (CPU Flex has no backward;
    the sparse path's gradients are tested on the GPU): equal to SDPA's, in float64."""
    q, k, v = (x.double().requires_grad_() for x in qkv(L=300, H=4, Hkv=2))
    grad = torch.randn(1, 4, 300, 32, dtype=torch.float64)
    out = torch.ops.asam.adaptive_attention(q, k, v, 32**-0.5, True, BS, 0.9, 0.0, 1, 1)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.library.opcheck(torch.ops.asam.adaptive_attention.default,
                          (q.detach(), k.detach(), v.detach(), 32**-0.5, True, BS, 0.9, 0.0, 1, 1))


# ------------------------------------------------------------------------------------------ who goes sparse


def test_exact_mode_leaves_unmarked_models_alone():
    inputs = qkv(L=512)
    torch._dynamo.reset()
    with asam_compile.capture() as cap, torch.no_grad():
        torch.compile(CausalAttention(), backend="asam", options={"min_seq_len": 0})(*inputs)
    (cand,) = cap.report.candidates
    assert cand.target == "sdpa" and "adaptive" not in cand.info


def test_marked_instances_only_go_sparse_and_eager_is_unchanged():
    model = TwoBlocks()
    inputs = qkv(L=2048)  # 16 blocks: the forced ones are a third (Note [Nothing to select])
    before = exact(model, inputs)
    assert asam_compile.sparse(model.layers[1:], coverage=1.0, min_seq_len=0) is not None
    assert torch.equal(exact(model, inputs), before), "marking changed eager results"
    assert isinstance(model.layers[1], Block) and type(model.layers[1]).__name__ == "Block"
    torch._dynamo.reset()
    with asam_compile.capture() as cap, torch.no_grad():
        out = torch.compile(model, backend="asam", fullgraph=True)(*inputs)
    by_module = {c.module: c for c in cap.report.candidates}
    assert by_module["layers.0.attn"].target == "sdpa", by_module
    assert by_module["layers.1.attn"].target == "adaptive", by_module
    assert "coverage=1.0" in by_module["layers.1.attn"].info["adaptive"]
    # the sum of the two blocks is an epilogue Inductor's CPU Flex template cannot take: it must not fuse
    assert not any(r.inductor_fallback for r in cap.reports), [r.inductor_fallback for r in cap.reports]
    torch.testing.assert_close(out, before, atol=EXACT_TOL, rtol=1e-4)
    # the mark survives pickling and deepcopy, and can be removed
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert getattr(type(clone.layers[1]), "__asam_sparse__") == {"coverage": 1.0, "min_seq_len": 0}
        assert not hasattr(type(clone.layers[0]), "__asam_sparse__")
    asam_compile.sparse(model.layers[1], enabled=False)
    assert type(model.layers[1]) is Block


def test_class_decorator_and_settings_override_options():
    @asam_compile.sparse(coverage=1.0, window=3)
    class Marked(CausalAttention):
        pass

    @asam_compile.sparse
    class MarkedDefault(CausalAttention):
        pass

    inputs = qkv(L=2048)  # 16 blocks: the forced ones are a third (Note [Nothing to select])
    for cls, expected in ((Marked, "coverage=1.0, max_density=0.5, window=3"), (MarkedDefault, "coverage=0.8,")):
        torch._dynamo.reset()
        with asam_compile.capture() as cap, torch.no_grad():
            torch.compile(cls(), backend="asam", options={"min_seq_len": 0, "coverage": 0.8})(*inputs)
        (cand,) = cap.report.candidates
        assert cand.target == "adaptive" and expected in cand.info["adaptive"], cand.info


@pytest.mark.parametrize(
    "why, options, make",
    [
        ("min_seq_len", {"min_seq_len": 4096}, lambda: (CausalAttention(), qkv(L=512))),
        ("dropout", {}, lambda: (nn.Dropout(0.1), None)),
        ("no backward", {}, lambda: (CausalAttention(), tuple(x.requires_grad_() for x in qkv(L=512)))),
        ("mask", {}, lambda: (None, None)),
    ],
)
def test_sites_that_stay_exact_say_why(why, options, make):
    model, inputs = make()
    if why == "dropout":

        class DropAttn(nn.Module):
            def forward(self, q, k, v):
                return F.dropout(F.softmax(q @ k.transpose(-2, -1), -1), 0.1, training=True) @ v

        model, inputs = DropAttn(), qkv(L=512)
    if why == "mask":

        class PaddedAttn(nn.Module):
            def forward(self, q, k, v, pad):
                s = q @ k.transpose(-2, -1) + pad
                return F.softmax(s, -1) @ v

        # an arbitrary (L, S) additive mask too large to lift as a run-time capture: it stays a dense SDPA mask,
        # which the adaptive mode cannot run inside (a padding vector would become a Flex block mask, see
        # tests/test_runtime_masks.py)
        g = torch.Generator().manual_seed(0)
        pad = torch.where(torch.rand(1, 1, 1100, 1100, generator=g) < 0.3, float("-inf"), 0.0)
        pad.diagonal(dim1=-2, dim2=-1).zero_()
        model, inputs = PaddedAttn(), (*qkv(L=1100), pad)
    opts = {"mode": "adaptive", "min_seq_len": 0, **options}
    torch._dynamo.reset()
    with asam_compile.capture() as cap, torch.no_grad() if why != "no backward" else torch.enable_grad():
        out = torch.compile(model, backend="asam", options=opts)(*inputs)
    (cand,) = cap.report.candidates
    assert cand.target == "sdpa" and cand.info["adaptive"].startswith("exact: "), cand.info
    assert {"min_seq_len": "min_seq_len", "dropout": "dropout", "no backward": "backward",
            "mask": "mask"}[why] in cand.info["adaptive"]
    if why in ("min_seq_len", "mask"):
        torch.testing.assert_close(out, exact(model, inputs), atol=EXACT_TOL, rtol=1e-4)


def test_hf_llama_adaptive_full_coverage_matches_exact():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 600))
    ref = exact(model, (ids,)).logits
    out, cap = compile_adaptive(model, (ids,), coverage=1.0, max_density=1.0)
    assert [c.target for c in cap.report.candidates] == ["adaptive", "adaptive"]
    assert all(c.info["enable_gqa"] and c.info["is_causal"] for c in cap.report.candidates)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"mode": "sparse"}, "mode"),
        ({"coverage": 0.0}, "coverage"),
        ({"coverage": 1.5}, "coverage"),
        ({"max_density": -1}, "max_density"),
        ({"window": 0}, "window"),
        ({"sinks": 1.5}, "sinks"),
        ({"min_seq_len": True}, "min_seq_len"),
        ({"coverag": 0.9}, "coverag"),
        ({"dense_fallback": "yes"}, "dense_fallback"),
    ],
)
def test_bad_options_name_what_was_wrong(options, needle):
    with pytest.raises(ValueError, match=needle):
        asam_compile.AsamConfig.from_options(options)


def test_options_and_enabled_of_the_wrong_type_name_the_problem():
    with pytest.raises(TypeError, match="options must be a dict"):
        asam_compile.AsamConfig.from_options(["strict"])
    with pytest.raises(TypeError, match="enabled='no'"):
        asam_compile.sparse(nn.Linear(2, 2), enabled="no")


def test_sparse_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="int"):
        asam_compile.sparse(3)
    with pytest.raises(TypeError, match="not an nn.Module"):
        asam_compile.sparse(dict)
    with pytest.raises(TypeError, match="str"):
        asam_compile.sparse([nn.Linear(2, 2), "x"])
    with pytest.raises(ValueError, match="coverag"):
        asam_compile.sparse(nn.Linear(2, 2), coverag=0.9)
    with pytest.raises(ValueError, match="coverage"):
        asam_compile.sparse(nn.Linear(2, 2), coverage=2)


def test_dynamic_lengths_reuse_one_sparse_graph_and_min_seq_len_guards():
    """Note [Adaptive under dynamic shapes]: one graph serves every length above min_seq_len, sparse and equal
    to the dense reference over the kept blocks; a shorter input recompiles once into an exact graph."""
    opts = {"mode": "adaptive", "min_seq_len": 400, "coverage": 0.5, "max_density": 1.0, "strict": True}
    settings = SparseSettings(BS, 0.5, 1.0, 400, 2, 1)
    torch._dynamo.reset()
    compiled = torch.compile(CausalAttention(), backend="asam", dynamic=True, options=opts)
    targets = []
    for L in (520, 777, 300, 650):
        inputs = qkv(L=L, H=2)
        with torch.no_grad(), asam_compile.capture() as cap:
            out = compiled(*inputs)
        targets.append([c.target for c in cap.report.candidates])
        if L >= 400:
            ref, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=settings)
            assert density < 0.95, density
        else:
            ref = exact(CausalAttention(), inputs)
        torch.testing.assert_close(out, ref, atol=EXACT_TOL, rtol=1e-4)
    # compiled at 520 (sparse, reused at 777 and 650), once more at 300 (exact)
    assert targets == [["adaptive"], [], ["sdpa"], []], targets


class ProjectedAttention(nn.Module):
    """BERT-style: q, k, v are views (view + transpose) of (B*L, H*E) projections."""

    def __init__(self, heads=4, dim=32) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.q, self.k, self.v = (nn.Linear(heads * dim, heads * dim) for _ in range(3))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        probs = F.softmax(q @ k.transpose(-2, -1) / self.dim**0.5, dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, L, -1)


def test_projection_views_reach_cpu_flex():
    """Inductor's CPU Flex template reads the size of the buffer under a q/k/v view; views of a projection
    made it fail ("not enough values to unpack") and fall back to exact. They now get buffers of their own."""
    torch.manual_seed(0)
    model = ProjectedAttention().eval()
    x = torch.randn(2, 300, 128)
    out, cap = compile_adaptive(model, (x,), block_size=32, coverage=1.0, max_density=1.0)
    assert [c.target for c in cap.report.candidates] == ["adaptive"]
    assert not any(r.inductor_fallback for r in cap.reports), [r.inductor_fallback for r in cap.reports]
    torch.testing.assert_close(out, exact(model, (x,)), atol=EXACT_TOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------- sampled estimator


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("chunk", [1 << 26, 1000], ids=["one_chunk", "chunked"])
def test_sampled_estimator_is_the_block_mass_of_exact_rows(causal, chunk, monkeypatch):
    """Note [Block estimators]: the sampled mass equals the exact softmax rows at the sampled queries, summed per
    key block and averaged, whatever the chunking, with GQA and a ragged last block."""
    monkeypatch.setattr(selection, "_SAMPLED_CHUNK", chunk)
    q, k, _ = qkv(L=1000, H=4, Hkv=2)
    scale = 32**-0.5
    QB = -(-1000 // BS)
    i = torch.arange(QB)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(QB, QB, dtype=torch.bool)
    mass = selection.sampled_mass(q, k, scale, causal, allowed, BS)
    scores = q @ k.repeat_interleave(2, 1).transpose(-2, -1) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(1000, 1000, dtype=torch.bool).triu(1), float("-inf"))
    P = F.pad(scores.softmax(-1), (0, QB * BS - 1000))
    offsets = torch.linspace(0, BS - 1, selection.SAMPLED_ROWS).round().long().unique()
    for qb in (0, 3, QB - 1):
        rows = (qb * BS + offsets).clamp(max=999)
        want = P[:, :, rows].view(1, 4, len(offsets), QB, BS).sum((2, 4)) / len(offsets)
        torch.testing.assert_close(mass[:, :, qb], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, QB), atol=1e-5, rtol=1e-5)


def test_sampled_estimator_end_to_end_and_its_option():
    inputs = planted(H=2, L=2048)
    model = CausalAttention()
    out, cap = compile_adaptive(model, inputs, coverage=0.95, max_density=1.0, window=1, sinks=0, estimator="sampled")
    (cand,) = cap.report.candidates
    assert cand.target == "adaptive" and "estimator=sampled" in cand.info["adaptive"], cand.info
    st = SparseSettings(BS, 0.95, 1.0, 0, 1, 0, estimator="sampled")
    ref, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=st)
    torch.testing.assert_close(out, ref, atol=EXACT_TOL, rtol=1e-4)
    assert density < 0.5, density
    with pytest.raises(ValueError, match="estimator"):
        asam_compile.AsamConfig.from_options({"estimator": "antidiagonal"})
    with pytest.raises(ValueError, match="estimator"):
        asam_compile.sparse(torch.nn.Linear(2, 2), estimator="bogus")


def test_inside_a_mask_sinks_count_full_blocks_and_window_the_last_allowed_ones():
    """Note [Adaptive over a structured mask]: with nothing to estimate (coverage 0: forced blocks only), a row
    whose first allowed block is cut by left padding keeps it and the next (full) block as its sink, and its last
    `window` allowed blocks; a causal block set forces what the causal selection forces."""
    q = k = torch.zeros(1, 1, 8 * BS, 16)
    st = SparseSettings(BS, 0.0, 1.0, 0, 2, 1)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    partial = torch.eye(8, dtype=torch.bool)
    allowed[:, :3] = False  # keys of blocks 0-2 are padding; block 3 is cut by it
    partial[:, 3] = allowed[:, 3]
    kept = selection.select(q, k, scale=1.0, causal=False, settings=st, blocks=(allowed[None, None], partial[None, None]))[0][0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(3, 8):
        expected[i, 3:5] = True  # the cut block and the first full one
        expected[i, max(3, i - 1):i + 1] = True  # the last two allowed blocks
    expected &= allowed
    assert torch.equal(kept, expected), (kept.int(), expected.int())
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    by_mask = selection.select(q, k, scale=1.0, causal=False, settings=st, blocks=(causal[None, None], torch.eye(8, dtype=torch.bool)[None, None]))
    assert torch.equal(by_mask[0][0, 0], selection.select(q, k, scale=1.0, causal=True, settings=st)[0][0, 0])
    # no causality (BERT-like right padding: keys of blocks 6-7 are padding, block 5 is cut): every row keeps its
    # sink, its own block and neighbour, and the last allowed blocks
    allowed = torch.zeros(8, 8, dtype=torch.bool)
    allowed[:, :6] = True
    partial = torch.zeros(8, 8, dtype=torch.bool)
    partial[:, 5] = True
    kept = selection.select(q, k, scale=1.0, causal=False, settings=st, blocks=(allowed[None, None], partial[None, None]))[0][0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, 0] = expected[:, 4:6] = True  # the sink and the last two allowed blocks
    for i in range(8):
        expected[i, max(0, i - 1):i + 2] = True  # the query block's own position, window 2 either side (< 2)
    assert torch.equal(kept, expected & allowed), (kept.int(), (expected & allowed).int())


def test_take_keeps_the_largest_estimates_up_to_the_need_and_their_ties():
    """Note [Selection cost]: _take ranks values only; the smallest value the coverage rule takes is a threshold,
    so blocks tied with it are all kept, and a block estimated at zero never is."""
    rest = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.0]])

    def take(need):
        return selection.take_by_coverage(rest, torch.tensor([[need]])).nonzero()[:, 1].tolist()

    assert take(0.7) == [0, 2]  # 0.5, then 0.3 (0.5 < 0.7 before it); 0.1 follows 0.8 >= 0.7
    assert take(0.85) == [0, 1, 2, 3]  # one 0.1 is needed: its tie comes with it
    assert take(0.0) == [] and take(-1.0) == []
    assert take(5.0) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------ settings and planning


def test_a_window_whose_forced_blocks_exceed_max_density_skips_the_selection():
    """Note [Nothing to select]: a 512-token window in blocks of 128 allows at most 5 key blocks per query block
    and the sink and window blocks are 3 of them, above max_density=0.5: the site stays exact (Flex on the
    window's blocks), the report says why; a wide window of the same length still goes adaptive."""
    inputs = qkv(L=2048, H=2)
    out, cap = compile_adaptive(SlidingWindowCausal(512), inputs, block_size=128, flex="always")
    (cand,) = cap.report.candidates
    assert cand.target == "flex" and count_adaptive(cap.graphs) == 0, cand.info
    assert "selection is skipped" in cand.info["adaptive"] and "max_density=0.5" in cand.info["adaptive"]
    torch.testing.assert_close(out, exact(SlidingWindowCausal(512), inputs), atol=EXACT_TOL, rtol=1e-4)
    _, cap = compile_adaptive(SlidingWindowCausal(1536), inputs, block_size=128, flex="always")
    assert count_adaptive(cap.graphs) == 1, cap.report.candidates[0].info


def test_forced_blocks_are_the_selections_own():
    """The plan's rule reads selection.forced_blocks, which is what the selection keeps whatever the estimate:
    with coverage too small to take any block, the kept set is exactly the forced set."""
    st = SparseSettings(block_size=BS, coverage=1e-6, max_density=1.0, min_seq_len=0, window=2, sinks=1)
    q, k, _ = qkv(L=1000)
    kept = selection.select(q, k, scale=32**-0.5, causal=True, settings=st).kept
    forced, allowed, _ = selection.forced_blocks(1000, 1000, causal=True, settings=st)
    assert torch.equal(kept, forced.expand_as(kept))
    assert selection.forced_density(forced, allowed) == pytest.approx(float(forced.sum() / allowed.sum()))


def test_sparse_settings_nest_in_the_config_and_shorthands_set_one_field():
    """AsamConfig.sparse holds the adaptive settings whole; `coverage=` is a shorthand for one field of it, and
    `block_size=` sets the selection block and the structured masks' Flex tile together."""
    cfg = asam_compile.AsamConfig.from_options({"coverage": 0.9, "sparse": {"window": 3}})
    assert cfg.sparse == SparseSettings(coverage=0.9, window=3)
    both = asam_compile.AsamConfig.from_options({"block_size": 64})
    assert both.sparse.block_size == 64 and both.flex_block_size == 64
    alone = asam_compile.AsamConfig.from_options({"sparse": SparseSettings(block_size=64)})
    assert alone.sparse.block_size == 64 and alone.flex_block_size == 128
    assert both.cache_key() != alone.cache_key()
    with pytest.raises(ValueError, match="coverage=2"):
        asam_compile.AsamConfig.from_options({"sparse": {"coverage": 2}})
    with pytest.raises(ValueError, match="windw"):
        SparseSettings.checked(windw=2)
    assert SparseSettings().replaced(sinks=0).sinks == 0
