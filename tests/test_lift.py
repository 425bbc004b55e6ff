"""passes/lift: masks written as real models write them, lifted to index functions and checked elementwise."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from asam_compile.kernels.block_mask import build_block_mask
from asam_compile.passes import normalize
from asam_compile.passes.lift import Lifted, NotLiftable, lift
from asam_compile.passes.mask_names import name_mask

B, H, L, E = 2, 2, 24, 16
MIN = torch.finfo(torch.float32).min


def qkv(L_: int = L, S_: int | None = None) -> tuple[torch.Tensor, ...]:
    S_ = L_ if S_ is None else S_
    return torch.randn(B, H, L_, E), torch.randn(B, H, S_, E), torch.randn(B, H, S_, E)


def attend(q, k, v, mask=None, fill=None):
    """Eager attention: an additive `mask`, or `fill` = (bool mask, keep?)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores + mask
    if fill is not None:
        m, keep = fill
        scores = torch.where(m, scores, float("-inf")) if keep else scores.masked_fill(m, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


# ------------------------------------------------------------------------------------- the spellings


class HFCausal(nn.Module):
    """transformers 5 eager mask: index aranges, a broadcast comparison, expand, where(0, finfo.min)."""

    def forward(self, q, k, v):
        n_q, n_kv = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(n_q, device=q.device) + 0
        kv_idx = torch.arange(n_kv, device=q.device) + 0
        allowed = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]
        allowed = allowed.expand(q.shape[0], -1, n_q, n_kv)
        mask = torch.where(allowed, torch.tensor(0.0, device=q.device, dtype=q.dtype), MIN)
        return attend(q, k, v, mask=mask)


class MistralSliding(nn.Module):
    """transformers 5 sliding window: ones((), bool) & (kv > q - W) & (kv <= q), each `.to(device)`."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        n = q.shape[-2]
        q_idx = (torch.arange(n, device=q.device) + 0)[None, None, :, None]
        kv_idx = (torch.arange(n, device=q.device) + 0)[None, None, None, :]
        allowed = q_idx.new_ones((), dtype=torch.bool)
        allowed = allowed & (kv_idx > q_idx - self.window).to(q.device)
        allowed = allowed & (kv_idx <= q_idx).to(q.device)
        allowed = allowed.expand(q.shape[0], -1, n, n)
        mask = torch.where(allowed, torch.tensor(0.0, device=q.device), MIN)
        return attend(q, k, v, mask=mask)


class NanoGPT(nn.Module):
    """nanoGPT: a tril buffer sliced to the sequence, `== 0`, masked_fill(-inf)."""

    def __init__(self, block_size: int = 64) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        T = q.size(-2)
        return attend(q, k, v, fill=(self.bias[:, :, :T, :T] == 0, False))


class TriuNegInf(nn.Module):
    """Whisper / old seq2seq decoders: an additive triu(full(-inf), 1)."""

    def forward(self, q, k, v):
        n = q.size(-2)
        return attend(q, k, v, mask=torch.triu(torch.full((n, n), float("-inf"), device=q.device), 1))


class TrilOnes(nn.Module):
    """A keep-mask from tril(ones(L, S)), made bool and viewed to 4-D."""

    def forward(self, q, k, v):
        m = torch.tril(torch.ones(q.size(-2), k.size(-2), device=q.device)).bool().view(1, 1, q.size(-2), k.size(-2))
        return attend(q, k, v, fill=(m, True))


class ChunkedCausal(nn.Module):
    """Llama 4 style chunked attention: q // C == kv // C, and causal inside the chunk."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v):
        n = q.size(-2)
        pos = torch.arange(n, device=q.device)
        same = torch.floor_divide(pos[:, None], self.chunk) == pos[None, :] // self.chunk
        m = (same & (pos[None, :] <= pos[:, None])).unsqueeze(0).unsqueeze(0)
        return attend(q, k, v, fill=(m, True))


class LocalWindow(nn.Module):
    """Bidirectional local attention: |q - kv| <= W, and a remainder term that is always true."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        n = q.size(-2)
        pos = torch.arange(n, device=q.device)
        diff = pos[:, None] - pos[None, :]
        m = (torch.abs(diff) <= self.window) & (torch.remainder(pos[None, :], 1) == 0)
        return attend(q, k, v, fill=(~m, False))


class DocumentBuffer(nn.Module):
    """Packed documents, one segment-id row per batch element kept in a buffer (depends on b)."""

    def __init__(self) -> None:
        super().__init__()
        seg = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 12 + [1] * 12])
        self.register_buffer("seg", seg)

    def forward(self, q, k, v):
        same = self.seg[:, None, :, None] == self.seg[:, None, None, :]
        return attend(q, k, v, fill=(same, True))


# ------------------------------------------------------------------------------------- helpers


def capture(module: nn.Module, *inputs, dynamic: bool = False) -> tuple[fx.GraphModule, list]:
    """The Dynamo graph of `module` and its example inputs, after asam's normalize pass."""
    graphs = []

    def capture_gm(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(module, backend=capture_gm, fullgraph=True, dynamic=dynamic)(*inputs)
    gm, example_inputs = graphs[0]
    normalize.run(gm, None)
    return gm, example_inputs


def _reaches_matmul(node: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target is torch.matmul:
            return True
        stack.extend(n.all_input_nodes)
    return False


def mask_node(gm: fx.GraphModule) -> tuple[fx.Node, tuple[int, ...]]:
    """The mask feeding the scores (additive term, fill mask or where condition), and the scores shape."""
    sm = next(n for n in gm.graph.nodes if n.target in (torch.softmax, F.softmax))
    cur = sm.args[0]
    shape = tuple(cur.meta["example_value"].shape)
    while True:
        if cur.target in (torch.add, operator.add):
            a, b = cur.args[:2]
            return (b if _reaches_matmul(a) else a), shape
        if cur.target is torch.masked_fill:
            return cur.args[1], shape
        if cur.target is torch.where:
            return cur.args[0], shape
        cur = cur.args[0]


def real_value(gm: fx.GraphModule, example_inputs: list, node: fx.Node) -> torch.Tensor:
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    # a dynamic-shape graph takes its sizes as inputs: the example's values
    interp.run(*(x.node.hint if isinstance(x, torch.SymInt) else x for x in example_inputs))
    return interp.env[node]


def grids(shape: tuple[int, ...], dtype=torch.int64) -> tuple[torch.Tensor, ...]:
    Bs, Hs, Ls, Ss = shape
    return (
        torch.arange(Bs, dtype=dtype)[:, None, None, None],
        torch.arange(Hs, dtype=dtype)[None, :, None, None],
        torch.arange(Ls, dtype=dtype)[None, None, :, None],
        torch.arange(Ss, dtype=dtype)[None, None, None, :],
    )


def assert_lifted_equal(lifted: Lifted, real: torch.Tensor, scores_shape: tuple[int, ...]) -> None:
    """fn on the whole (b, h, q, kv) grid of the scores equals the node's value broadcast to the scores."""
    for dtype in (torch.int64, torch.int32):  # FlexAttention hands mask_mod int32 indices
        out = lifted.fn(*grids(scores_shape, dtype))
        assert out.dtype == real.dtype == lifted.dtype
        assert tuple(real.shape) == lifted.shape
        assert torch.equal(out.expand(scores_shape), real.expand(scores_shape))


def lift_case(module: nn.Module, *inputs) -> tuple[Lifted, torch.Tensor, tuple[int, ...]]:
    gm, example_inputs = capture(module, *inputs)
    node, shape = mask_node(gm)
    (lifted,) = lift([node], gm, example_inputs)
    return lifted, real_value(gm, example_inputs, node), shape


# ------------------------------------------------------------------------------------- it lifts, exactly

CASES = [
    # (module, inputs, expected name, expected axes)
    (HFCausal(), qkv(), "causal", {"q", "kv"}),
    (HFCausal(), qkv(L, 2 * L), "causal", {"q", "kv"}),  # top-left aligned, as SDPA is_causal
    (MistralSliding(8), qkv(), "sliding_window_8", {"q", "kv"}),
    (NanoGPT(), qkv(), "lifted_mask", {"q", "kv"}),  # marks removed keys: a name is for keep-masks
    (TriuNegInf(), qkv(), "causal", {"q", "kv"}),
    (TrilOnes(), qkv(), "causal", {"q", "kv"}),
    (TrilOnes(), qkv(L, L + 7), "causal", {"q", "kv"}),
    (ChunkedCausal(5), qkv(), "lifted_mask", {"q", "kv"}),
    (LocalWindow(3), qkv(), "lifted_mask", {"q", "kv"}),
    (DocumentBuffer(), qkv(), "lifted_mask", {"b", "q", "kv"}),
]


@pytest.mark.parametrize("module, inputs, name, axes", CASES, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "")
def test_lift_matches_graph(module, inputs, name, axes):
    lifted, real, shape = lift_case(module, *inputs)
    assert_lifted_equal(lifted, real, shape)
    assert lifted.fn.__name__ == name
    assert lifted.axes == axes


def test_lift_hf_transformers_models():
    transformers = pytest.importorskip("transformers")
    for cls, cfg_cls, extra, name in (
        (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, "causal"),
        (transformers.MistralForCausalLM, transformers.MistralConfig, {"sliding_window": 8}, "sliding_window_8"),
    ):
        cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, attn_implementation="eager", **extra)
        torch._dynamo.reset()
        with torch.no_grad():
            gm, example_inputs = capture(cls(cfg).eval(), torch.randint(0, 64, (2, 20)))
        node, shape = mask_node(gm)
        (lifted,) = lift([node], gm, example_inputs)
        assert_lifted_equal(lifted, real_value(gm, example_inputs, node), shape)
        assert lifted.fn.__name__ == name and lifted.axes == {"q", "kv"}


def test_lift_several_nodes_share_work():
    gm, example_inputs = capture(MistralSliding(4), *qkv())
    where, shape = mask_node(gm)
    allowed = where.args[0]
    lifted_where, lifted_allowed = lift([where, allowed], gm, example_inputs)
    assert lifted_where.dtype == torch.float32 and lifted_allowed.dtype == torch.bool
    for lifted, node in ((lifted_where, where), (lifted_allowed, allowed)):
        assert_lifted_equal(lifted, real_value(gm, example_inputs, node), shape)


def test_lifted_mask_under_vmap_matches_dense():
    """create_block_mask calls mask_mod on 0-d tensors under vmap; a captured buffer is indexed there."""
    lifted, real, shape = lift_case(NanoGPT(), *qkv())

    def keep(b, h, q_idx, kv_idx):
        return ~lifted.fn(b, h, q_idx, kv_idx)

    ref = create_block_mask(keep, 1, 1, L, L, device="cpu", BLOCK_SIZE=8)
    ours, _ = build_block_mask(keep, 1, 1, L, L, "cpu", block_size=8)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    dense = torch.nn.attention.flex_attention.create_mask(keep, 1, 1, L, L, device="cpu")
    assert torch.equal(dense, ~real.expand(1, 1, L, L))


@pytest.mark.parametrize("module", [MistralSliding(6), TrilOnes(), DocumentBuffer(), TriuNegInf()],
                         ids=lambda m: type(m).__name__)
def test_lifted_mask_drives_flex_attention(module):
    """End to end: a lifted mask (constants, tril, a captured buffer) in compiled FlexAttention equals the module."""
    inputs = qkv()
    gm, example_inputs = capture(module, *inputs)
    node, _ = mask_node(gm)
    (lifted,) = lift([node], gm, example_inputs)
    if lifted.dtype == torch.bool:
        keep = lifted.fn
    else:  # an additive mask: 0 keeps, finfo.min / -inf removes

        def keep(b, h, q_idx, kv_idx):
            return lifted.fn(b, h, q_idx, kv_idx) == 0

    bm, density = build_block_mask(keep, B if "b" in lifted.axes else 1, 1, L, L, "cpu", block_size=8)
    assert 0 < density < 1
    out = torch.compile(flex_attention)(*inputs, block_mask=bm)
    torch.testing.assert_close(out, module(*inputs), atol=1e-5, rtol=1e-5)


class Spelled(nn.Module):
    """One mask expression, with a tril buffer at hand (as nanoGPT keeps one)."""

    def __init__(self, mask_fn) -> None:
        super().__init__()
        self.mask_fn = mask_fn
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, q, k, v):
        return attend(q, k, v, **self.mask_fn(self, q, k))


def _pos(n=L):
    return torch.arange(n)


SPELLINGS = {
    "transpose_t": lambda s, q, k: {"fill": ((_pos()[:, None] >= _pos()[None, :]).transpose(-2, -1).t(), True)},
    "where_python_scalars": lambda s, q, k: {"mask": torch.where(_pos()[:, None] >= _pos(), 0.0, float("-inf"))},
    "zeros_masked_fill": lambda s, q, k: {
        "mask": torch.zeros(L, L).masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool)), float("-inf"))},
    "buffer_int_index": lambda s, q, k: {"fill": (s.bias[0, 0, :L, :L].bool(), True)},
    "buffer_ellipsis": lambda s, q, k: {"fill": (s.bias[..., :L, :L] > 0.5, True)},
    "buffer_offset_slice": lambda s, q, k: {"fill": (s.bias[:, :, 10:10 + L, :L] > 0, True)},
    "buffer_step_slice": lambda s, q, k: {"fill": (s.bias[0, 0, ::2, ::2][:L, :L] > 0, True)},
    "buffer_squeeze_reshape": lambda s, q, k: {"fill": (s.bias[:, :, :L, :L].squeeze(0).reshape(1, L, L) > 0, True)},
    "arange_start_step": lambda s, q, k: {
        "fill": (torch.arange(5, 5 + 2 * L, 2).view(-1, 1) >= torch.arange(5, 5 + 2 * L, 2).unsqueeze(0), True)},
    "full_like_of_activation": lambda s, q, k: {
        "mask": torch.full_like(q[..., :1], 0.0).expand(-1, -1, -1, L) + torch.triu(torch.full((L, L), -1e9), 1)},
    "float16_compare": lambda s, q, k: {
        "fill": ((_pos().to(torch.float16)[:, None] * 0.5) >= (_pos()[None, :] * 0.5), True)},
    "clamp": lambda s, q, k: {"fill": (torch.clamp(_pos()[:, None] - _pos()[None, :], min=0, max=3) < 3, True)},
    "logical_ops": lambda s, q, k: {
        "fill": (torch.logical_or(torch.logical_not(_pos()[:, None] < _pos()), _pos()[None, :] == 0), True)},
    "div_rounding_floor": lambda s, q, k: {
        "fill": (torch.div(_pos()[:, None], 4, rounding_mode="floor") >= torch.div(_pos(), 4, rounding_mode="floor"), True)},
    "permute_3d": lambda s, q, k: {"fill": ((_pos()[:, None, None] >= _pos()[None, :, None]).permute(2, 1, 0), True)},
    "int_additive": lambda s, q, k: {"mask": (_pos()[None, :] > _pos()[:, None]).long() * -10000},
    "T_attribute": lambda s, q, k: {"fill": ((_pos()[:, None] <= _pos()[None, :]).T, True)},
    "compare_keyword_operand": lambda s, q, k: {"fill": (torch.ge(_pos()[:, None], other=_pos()[None, :] * 2), True)},
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_lift_more_spellings(name):
    lifted, real, shape = lift_case(Spelled(SPELLINGS[name]), *qkv())
    assert_lifted_equal(lifted, real, shape)
    assert lifted.axes <= {"q", "kv"}


# ------------------------------------------------------------------------------------- near misses


class PaddingFromValues(nn.Module):
    """A padding mask computed from an activation's values: depends on run-time data."""

    def forward(self, q, k, v):
        keep = (k.sum(-1) > 0)[:, :, None, :]
        return attend(q, k, v, fill=(keep, True))


class ThresholdOnInput(nn.Module):
    def forward(self, q, k, v, x):
        return attend(q, k, v, fill=(x > 0, True))


class RandomMask(nn.Module):
    def forward(self, q, k, v):
        n = q.size(-2)
        return attend(q, k, v, fill=(torch.rand(n, n) > 0.5, True))


class CumsumMask(nn.Module):
    def forward(self, q, k, v):
        n = q.size(-2)
        return attend(q, k, v, fill=(torch.cumsum(torch.ones(n, n), -1) <= 3, True))


class DocumentIds(nn.Module):
    """Packed documents of a fixed layout: segment ids from a cumsum over document starts (not index
    arithmetic), then doc[q] == doc[kv] by indexing, and causal."""

    def forward(self, q, k, v):
        n = q.size(-2)
        pos = torch.arange(n)
        starts = (pos % 10 == 0) | (pos == 3)
        doc = starts.long().cumsum(0)
        qi, ki = pos[:, None], pos[None, :]
        return attend(q, k, v, fill=((doc[qi] == doc[ki]) & (ki <= qi), True))


class InPlaceTril(nn.Module):
    def forward(self, q, k, v):
        n = q.size(-2)
        m = torch.ones(n, n, dtype=torch.bool)
        m.tril_()
        return attend(q, k, v, fill=(m, True))


class FlattenedMask(nn.Module):
    """A mask built flat and reshaped: merging dims is not a view our index functions follow."""

    def forward(self, q, k, v):
        n = q.size(-2)
        flat = torch.arange(n * n) % (n + 1) == 0
        return attend(q, k, v, fill=(flat.view(n, n) | torch.tril(torch.ones(n, n, dtype=torch.bool)), True))


@pytest.mark.parametrize(
    "module, extra, reason",
    [
        (PaddingFromValues(), (), "op Tensor.sum is not index arithmetic"),
        (ThresholdOnInput(), (torch.randn(L, L),), "reads the values of runtime input"),
        (RandomMask(), (), "random op torch.rand"),
        (CumsumMask(), (), "op torch.cumsum is not index arithmetic"),
        (InPlaceTril(), (), "changed in place"),
        (FlattenedMask(), (), "merges or splits dims"),
    ],
    ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "",
)
def test_not_liftable(module, extra, reason):
    gm, example_inputs = capture(module, *qkv(), *extra)
    node, _ = mask_node(gm)
    with pytest.raises(NotLiftable, match=reason):
        lift([node], gm, example_inputs)


@pytest.mark.parametrize("n", [24, 37, 130])
def test_small_per_token_constants_are_read_by_index(n):
    """Note [Small constants]: the cumsum vector is evaluated once and gathered by the lifted indices; the
    lifted mask equals the graph's own mask exactly, at lengths that are not multiples of a block."""
    gm, example_inputs = capture(DocumentIds(), *qkv(n))
    node, _ = mask_node(gm)
    (lifted,) = lift([node], gm, example_inputs)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    got = lifted.fn(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q_idx, kv_idx)
    pos = torch.arange(n)
    doc = ((pos % 10 == 0) | (pos == 3)).long().cumsum(0)
    assert torch.equal(got.expand(n, n), (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None]))
    # the vector's own node computes it at run time (passed to Flex as an argument)
    assert any(c.node is not None and c.node.target == "cumsum" for c in lifted.captures), lifted.captures


def test_not_liftable_names_the_runtime_input():
    gm, example_inputs = capture(PaddingFromValues(), *qkv())
    node, _ = mask_node(gm)
    with pytest.raises(NotLiftable) as info:
        lift([node], gm, example_inputs)
    assert "runtime input l_k_" in str(info.value)


# ------------------------------------------------------------------------------------- dynamic shapes
# torch.compile(dynamic=True): one graph serves every length, so a lifted mask must be right at lengths other
# than the example's. Each module keeps its mask code in mask(q, k) to give the eager reference at any length.


class DynHFCausal(nn.Module):
    """transformers 5 eager causal mask, finfo.min inline (as HF writes it)."""

    def mask(self, q, k):
        n_q, n_kv = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(n_q, device=q.device) + 0
        kv_idx = torch.arange(n_kv, device=q.device) + 0
        allowed = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]
        allowed = allowed.expand(q.shape[0], -1, n_q, n_kv)
        return torch.where(allowed, torch.tensor(0.0, device=q.device, dtype=q.dtype), torch.finfo(q.dtype).min)

    def forward(self, q, k, v):
        return attend(q, k, v, mask=self.mask(q, k))


class DynMistralSliding(nn.Module):
    """Mistral sliding window with a python-int window: (kv > q - W) & (kv <= q)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def mask(self, q, k):
        n = q.shape[-2]
        q_idx = (torch.arange(n, device=q.device) + 0)[None, None, :, None]
        kv_idx = (torch.arange(n, device=q.device) + 0)[None, None, None, :]
        allowed = q_idx.new_ones((), dtype=torch.bool)
        allowed = allowed & (kv_idx > q_idx - self.window).to(q.device)
        allowed = allowed & (kv_idx <= q_idx).to(q.device)
        allowed = allowed.expand(q.shape[0], -1, n, n)
        return torch.where(allowed, torch.tensor(0.0, device=q.device), torch.finfo(q.dtype).min)

    def forward(self, q, k, v):
        return attend(q, k, v, mask=self.mask(q, k))


class DynNanoGPT(NanoGPT):
    def mask(self, q, k):
        T = q.size(-2)
        return self.bias[:, :, :T, :T] == 0


class DynHalfWindow(nn.Module):
    """A window of half the sequence: the mask changes with the length, no fixed index function exists."""

    def mask(self, q, k):
        n = q.shape[-2]
        pos = torch.arange(n, device=q.device)
        return pos[None, :] > pos[:, None] - (n // 2)

    def forward(self, q, k, v):
        return attend(q, k, v, fill=(self.mask(q, k), True))


class DynOffsetQueries(nn.Module):
    """Queries at the end of the keys (a KV cache): q_idx = arange(Lq) + (Lkv - Lq) uses both lengths."""

    def forward(self, q, k, v):
        n_q, n_kv = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(n_q) + (n_kv - n_q)
        return attend(q, k, v, fill=(torch.arange(n_kv)[None, :] <= q_idx[:, None], True))


class DynCompareWithLength(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n)
        return attend(q, k, v, fill=((pos[None, :] <= pos[:, None]) & (pos[None, :] < n - 1), True))


class DynFullOfLength(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        return attend(q, k, v, fill=(torch.arange(n)[:, None] + torch.full((n, 1), n) >= torch.arange(n), True))


LENGTHS = (17, 23, 40)  # <= the nanoGPT buffer (64); the example length is L = 24


def assert_lifted_at_lengths(lifted: Lifted, reference) -> None:
    """fn equals the eager mask on the full (b, h, q, kv) grid at lengths the example never had."""
    for n in LENGTHS:
        real = reference(n)
        shape = (B, H, n, n)
        for dtype in (torch.int64, torch.int32):
            out = lifted.fn(*grids(shape, dtype))
            assert out.dtype == real.dtype == lifted.dtype
            assert torch.equal(out.expand(shape), real.expand(shape)), n


@pytest.mark.parametrize(
    "module, name",
    [(DynHFCausal(), "causal"), (DynMistralSliding(8), "sliding_window_8"), (DynNanoGPT(), "lifted_mask")],
    ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "",
)
def test_lift_dynamic_shapes(module, name):
    torch._dynamo.reset()
    gm, example_inputs = capture(module, *qkv(), dynamic=True)
    assert any(isinstance(x, torch.SymInt) for x in example_inputs)  # really symbolic
    node, shape = mask_node(gm)
    (lifted,) = lift([node], gm, example_inputs)
    assert lifted.axes == {"q", "kv"} and lifted.fn.__name__ == name
    assert isinstance(lifted.shape[-1], torch.SymInt) and isinstance(lifted.shape[-2], torch.SymInt)
    assert lifted.shape[:2] in ((1, 1),) or isinstance(lifted.shape[0], torch.SymInt)
    assert_lifted_equal(lifted, real_value(gm, example_inputs, node), (B, H, L, L))  # the example length
    assert_lifted_at_lengths(lifted, lambda n: module.mask(*qkv(n)[:2]))


def test_lift_dynamic_shapes_hf_transformers_models():
    transformers = pytest.importorskip("transformers")
    for cls, cfg_cls, extra, name in (
        (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, "causal"),
        (transformers.MistralForCausalLM, transformers.MistralConfig, {"sliding_window": 8}, "sliding_window_8"),
    ):
        cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, attn_implementation="eager", **extra)
        model = cls(cfg).eval()
        torch._dynamo.reset()
        with torch.no_grad():
            gm, example_inputs = capture(model, torch.randint(0, 64, (2, 20)), dynamic=True)
        node, shape = mask_node(gm)
        (lifted,) = lift([node], gm, example_inputs)
        assert lifted.fn.__name__ == name and lifted.axes == {"q", "kv"}
        assert isinstance(lifted.shape[-1], torch.SymInt)

        seen = {}
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.__setitem__("mask", kwargs["attention_mask"]), with_kwargs=True)
        try:
            for n in LENGTHS:  # the model's own mask code, run eagerly at each length
                with torch.no_grad():
                    model(torch.randint(0, 64, (2, n)))
                real = seen["mask"]
                full = (2, cfg.num_attention_heads, n, n)
                out = lifted.fn(*grids(full, torch.int32))
                assert out.dtype == real.dtype
                assert torch.equal(out.expand(full), real.expand(full)), (cls.__name__, n)
        finally:
            hook.remove()


@pytest.mark.parametrize(
    "module, inputs, reason",
    [
        (DynHalfWindow(), qkv(), r"sub \(torch.sub\) computes with the value of dynamic size \(s\d+//2\)"),
        (DynOffsetQueries(), qkv(L, L + 8), r"computes with the value of dynamic size -s\d+ \+ s\d+"),
        (DynCompareWithLength(), qkv(), r"computes with the value of dynamic size s\d+ - 1"),
        (DynFullOfLength(), qkv(), r"value of dynamic size s\d+ \(as a fill value\)"),
    ],
    ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "",
)
def test_not_liftable_dynamic_shapes(module, inputs, reason):
    """A mask that uses a size symbol's value differs from length to length: no index function serves all."""
    torch._dynamo.reset()
    gm, example_inputs = capture(module, *inputs, dynamic=True)
    node, _ = mask_node(gm)
    with pytest.raises(NotLiftable, match=reason):
        lift([node], gm, example_inputs)
    # the same module lifts when its shapes are static
    torch._dynamo.reset()
    gm, example_inputs = capture(module, *inputs)
    node, _ = mask_node(gm)
    lift([node], gm, example_inputs)


# ------------------------------------------------------------------------------------- names


def test_name_mask():
    def sliding(W):
        return lambda b, h, q, kv: (kv <= q) & (kv > q - W)

    assert name_mask(sliding(8), 64, 64) == "sliding_window_8"
    assert name_mask(sliding(1024), 4096, 4096) == "sliding_window_1024"
    assert name_mask(sliding(64), 64, 64) == "causal"  # a window as long as the sequence is causal
    assert name_mask(lambda b, h, q, kv: q >= kv, 50, 50) == "causal"
    tril = torch.tril(torch.ones(50, 50, dtype=torch.bool))
    assert name_mask(lambda b, h, q, kv: tril[q, kv], 50, 50) == "causal"
    assert name_mask(lambda b, h, q, kv: (q - kv).abs() <= 3, 40, 40) == "bidirectional_window_3"
    assert name_mask(lambda b, h, q, kv: q // 16 == kv // 16, 64, 64) == "chunked_16"
    assert name_mask(lambda b, h, q, kv: (q + kv) % 3 == 0, 30, 30) == "lifted_mask"
    assert name_mask(lambda b, h, q, kv: torch.ones((), dtype=torch.bool), 30, 30) == "lifted_mask"
