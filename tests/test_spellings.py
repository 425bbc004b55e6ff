"""Spellings of attention that real models use (issue 14): each is rewritten, matches float64, and a near miss is
left alone with a reason that names the op."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from asam_compile import Reject
from helpers import assert_no_worse, compile_capture, double_copy, input_grads, max_abs_err, to_double


def _check(fn, inputs, expect_rewritten=1, grad_args=(), **options):
    """Compile with asam (rewrite only), assert `expect_rewritten` sites rewritten, the output no worse than
    the original's against float64, and the gradients of `grad_args` too. Returns the capture."""
    options = {"inductor": False, "strict": True, **options}
    out, cap = compile_capture(fn, inputs, **options)
    rewritten = [c for c in cap.report.candidates if c.status == "rewritten"]
    assert len(rewritten) == expect_rewritten, cap.report
    fn64 = double_copy(fn) if isinstance(fn, nn.Module) else fn
    ref = fn64(*to_double(inputs))
    assert_no_worse(max_abs_err(out, ref), max_abs_err(fn(*inputs), ref), "output")
    if grad_args:
        compiled = torch.compile(fn, backend="asam", options=options)
        g_ref, w = input_grads(fn64, to_double(inputs), grad_args)
        g_eager, _ = input_grads(fn, inputs, grad_args, w)
        g_new, _ = input_grads(compiled, inputs, grad_args, w)
        for a, r, e in zip(g_new, g_ref, g_eager):
            assert_no_worse(max_abs_err(a, r), max_abs_err(e, r), "gradient", slack=1e-5)
    return cap


def _qkv(B=2, H=4, L=16, E=8):
    return tuple(torch.randn(B, H, L, E) for _ in range(3))


# ------------------------------------------------------------------------------------------ aliasing


def test_an_in_place_write_to_an_unrelated_tensor_does_not_refuse_the_site():
    """A MoE router's `probs /= probs.sum()` between the model-wide mask and a layer's attention."""

    def layers(q, k, v, router_logits):
        mask = torch.triu(torch.full((16, 16), float("-inf")), 1)
        a = torch.softmax(q @ k.mT * 0.3 + mask, -1) @ v
        probs = torch.softmax(router_logits, -1)
        probs /= probs.sum(-1, keepdim=True)
        b = torch.softmax(a @ k.mT * 0.3 + mask, -1) @ v
        return b, probs

    cap = _check(layers, (*_qkv(), torch.randn(16, 4)), expect_rewritten=2)
    router = [c for c in cap.report.candidates if c.status == "refused"]
    assert len(router) == 1 and router[0].reject is not Reject.CHANGED_IN_PLACE, cap.report


def test_an_in_place_write_to_a_view_of_the_key_between_scores_and_values_refuses_the_site():
    def attn(q, k, v):
        s = q @ k.mT * 0.3
        k.view(-1)[:5] = 0.0  # the original's scores saw the old k; one SDPA call would see the new one
        return torch.softmax(s, -1) @ (v + k)

    _, cap = compile_capture(attn, _qkv(), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.CHANGED_IN_PLACE, cand


# ------------------------------------------------------------------------------- nn.MultiheadAttention


class _Pool(nn.Module):
    """SigLIP's pooling head: a learned probe attends over the tokens; the weights are dropped."""

    def __init__(self, keep_weights: bool = False, need_weights: bool = True):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 32))
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.keep_weights, self.need_weights = keep_weights, need_weights

    def forward(self, x):
        out, weights = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=self.need_weights)
        return (out, weights) if self.keep_weights else out


def test_multihead_attention_whose_weights_are_dropped_runs_sdpa():
    model = _Pool().eval()
    x = torch.randn(2, 10, 32)
    cap = _check(model, (x,), grad_args=(0,))
    (cand,) = cap.report.candidates
    assert cand.target == "sdpa" and cand.module.endswith("attention"), cand
    (gm,) = cap.graphs
    (call,) = [n for n in gm.graph.nodes if n.target is F.multi_head_attention_forward]
    assert call.kwargs["need_weights"] is False


def test_multihead_attention_whose_weights_are_returned_is_listed_and_refused():
    x = torch.randn(2, 10, 32)
    _, cap = compile_capture(_Pool(keep_weights=True).eval(), (x,), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.PROBS_ESCAPE and "need_weights" in cand.detail


def test_multihead_attention_that_already_runs_sdpa_is_listed():
    _, cap = compile_capture(_Pool(need_weights=False).eval(), (torch.randn(2, 10, 32),), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.reject is Reject.ALREADY_SDPA


# ------------------------------------------------------------------------------------ 0-dim constants


def gpt2_legacy(q, k, v):
    """GPT-2's legacy path: the scale and the fill value are 0-dim tensors built in the graph."""
    s = q @ k.mT / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype, device=q.device)
    causal = torch.ones(16, 16, dtype=torch.bool, device=q.device).tril()
    s = torch.where(causal, s, torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device))
    return torch.softmax(s, -1) @ v


def distilbert_fill(q, k, v, keep):
    s = (q / math.sqrt(8)) @ k.mT
    s = s.masked_fill(~keep, torch.tensor(torch.finfo(s.dtype).min))
    return torch.softmax(s, -1) @ v


def test_0_dim_tensor_scale_and_fill_are_read_as_numbers():
    cap = _check(gpt2_legacy, _qkv(), grad_args=(0, 1, 2))
    info = cap.report.candidates[0].info
    assert info["is_causal"] is True and info["scale"] == pytest.approx(8 ** -0.5, abs=1e-6), info


def test_0_dim_tensor_fill_of_a_padding_mask():
    keep = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    keep[1, ..., 10:] = False
    cap = _check(distilbert_fill, (*_qkv(), keep), grad_args=(0, 1, 2))
    assert cap.report.candidates[0].info["scale"] == pytest.approx(8 ** -0.5, abs=1e-6)


def test_a_0_dim_tensor_computed_from_inputs_is_a_runtime_scale_that_trains():
    def attn(q, k, v, t):
        return torch.softmax(q @ k.mT / t.sum(), -1) @ v

    cap = _check(attn, (*_qkv(), torch.tensor([2.0, 3.0])), grad_args=(0, 1, 2, 3))
    assert cap.report.candidates[0].info["scale"] == "symbolic"


def test_a_runtime_tensor_scale_applied_after_a_mask_is_a_near_miss():
    def attn(q, k, v, mask, t):
        return torch.softmax((q @ k.mT + mask) / t, -1) @ v

    _, cap = compile_capture(attn, (*_qkv(), torch.randn(16, 16), torch.tensor(2.0)), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.SCALE_NOT_SCALAR, cand


# ------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("spelling", ["torch.dropout", "F.dropout"])
def test_dropout_with_p_0_in_training_is_the_identity(spelling):
    drop = (lambda p: torch.dropout(p, 0.0, True)) if spelling == "torch.dropout" else (lambda p: F.dropout(p, 0.0))

    def attn(q, k, v):
        return drop(torch.softmax(q @ k.mT * 0.3, -1)) @ v

    cap = _check(attn, _qkv(), grad_args=(0, 1, 2))
    assert cap.report.candidates[0].info["dropout_p"] == 0.0


def test_torch_dropout_with_p_above_0_becomes_sdpa_dropout_p():
    def attn(q, k, v):
        return torch.dropout(torch.softmax(q @ k.mT * 0.3, -1), 0.25, True) @ v

    _, cap = compile_capture(attn, _qkv(), inductor=False, strict=True)
    assert cap.report.candidates[0].info["dropout_p"] == 0.25


# ------------------------------------------------------------------------ einsum and matmul, mixed


def test_einsum_scores_with_matmul_values():
    def attn(q, k, v):
        return torch.softmax(torch.einsum("bhld,bhsd->bhls", q, k) * 0.3, -1) @ v

    _check(attn, _qkv(), grad_args=(0, 1, 2))


def test_matmul_scores_with_einsum_values():
    def attn(q, k, v):
        return torch.einsum("bhls,bhsd->bhld", torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1), v)

    _check(attn, _qkv(), grad_args=(0, 1, 2))


def test_einsum_scores_in_a_permuted_layout_are_refused_with_a_reason():
    def attn(q, k, x):  # scores come out (b, l, h, s): h is not a query axis
        return torch.softmax(torch.einsum("bhld,bhsd->blhs", q, k) * 0.3, -1) @ x

    q, k, _ = _qkv()
    _, cap = compile_capture(attn, (q, k, torch.randn(2, 16, 16, 8)), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.EINSUM_UNSUPPORTED, cand


# ------------------------------------------------------------------------------- in-place spellings


def falcon(q, k, v):
    s = q @ k.transpose(-1, -2)
    s /= math.sqrt(q.size(-1))
    s.masked_fill_(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def test_in_place_scale_and_fill_on_fresh_scores_are_rewritten():
    cap = _check(falcon, _qkv(), grad_args=(0, 1, 2))
    assert cap.report.candidates[0].info["is_causal"] is True


def test_in_place_scale_of_scores_that_a_view_also_reads_is_refused():
    def attn(q, k, v):
        s = q @ k.mT
        first = s[:, :, :1]  # a view: it sees the in-place division
        s /= 4.0
        return torch.softmax(s, -1) @ v + first.sum()

    inputs = _qkv()
    out, cap = compile_capture(attn, inputs, inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.CHANGED_IN_PLACE and "itruediv" in cand.detail, cand
    torch.testing.assert_close(out, attn(*inputs))


# ------------------------------------------------------------------------------------ _safe_softmax


def test_aten_safe_softmax_gives_zero_rows_like_the_original():
    def attn(q, k, v, keep):
        s = (q @ k.mT * 0.3).masked_fill(~keep, float("-inf"))
        return torch.ops.aten._safe_softmax(s, -1) @ v

    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    keep[1, :, :4] = False  # rows with no key: _safe_softmax gives 0 there, softmax NaN
    out = _check(attn, (*_qkv(), keep), grad_args=(0, 1, 2))
    assert out.report.candidates[0].status == "rewritten"
    compiled = torch.compile(attn, backend="asam", options={"inductor": False})
    result = compiled(*_qkv(), keep)
    assert torch.isfinite(result).all() and result[1, :, :4].abs().max() == 0


# ------------------------------------------------------------------------ views between the matmuls

B, H, L, E = 2, 4, 16, 8


def _qkv3():
    return tuple(torch.randn(B * H, L, E) for _ in range(3))


def bart(q, k, v, mask):
    """BART: 3-D bmm scores, viewed 4-D to add the mask, back to 3-D for softmax and the value bmm."""
    s = torch.bmm(q, k.transpose(1, 2)) * E**-0.5
    s = s.view(B, H, L, L) + mask
    s = s.view(B * H, L, L)
    return torch.bmm(F.dropout(torch.softmax(s, dim=-1), p=0.0, training=False), v)


def bloom(q, k, v, alibi, masked):
    """BLOOM: ALiBi through baddbmm in 3-D, a 4-D masked_fill, the probabilities viewed 3-D for bmm."""
    scores = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=E**-0.5)
    scores = scores.view(B, H, L, L)
    scores = torch.masked_fill(scores, masked, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(B * H, L, L), v)


def deberta(q, k, v):
    """DeBERTa: 4-D scores and probabilities, viewed 3-D before the value bmm."""
    s = q.view(B, H, L, E) @ k.view(B, H, L, E).transpose(-1, -2) / math.sqrt(E)
    p = torch.softmax(s, -1)
    return torch.bmm(p.view(-1, L, L), v).view(B, H, L, E)


def _padding(additive: bool, left: bool = True):
    """A causal mask with padding in batch row 1: left padding leaves query rows without keys."""
    keep = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    keep[1, ..., slice(None, 3) if left else slice(L - 3, None)] = False
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min) if additive else ~keep


def test_bart_views_of_the_scores_around_the_mask():
    cap = _check(bart, (*_qkv3(), _padding(additive=True)), grad_args=(0, 1, 2))
    assert cap.report.candidates[0].info["mask"].startswith("dense")


def test_bloom_baddbmm_alibi_and_a_4d_fill():
    alibi = torch.randn(B * H, 1, L) * 0.5
    # right padding: BLOOM's float32 softmax of a float64 reference turns its finfo.min into -inf, so a row with
    # no key would be NaN in the reference itself
    cap = _check(bloom, (*_qkv3(), alibi, _padding(additive=False, left=False)), grad_args=(0, 1, 2, 3))
    assert cap.report.candidates[0].info["scale"] == pytest.approx(E**-0.5, abs=1e-6)


def test_deberta_view_of_the_probabilities_before_bmm():
    _check(deberta, _qkv3(), grad_args=(0, 1, 2))


def test_a_view_that_mixes_the_query_axis_is_refused():
    def attn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.3
        p = torch.softmax(s.view(B * H, L // 2, 2 * L), -1)  # rows of two queries: not attention
        return torch.bmm(p.view(B * H, L, L), v)

    out, cap = compile_capture(attn, _qkv3(), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused", cand


def test_a_float_mask_with_rows_of_no_key_has_finite_gradients_like_the_original():
    """An additive bias plus a fill that removes whole rows: SDPA's backward alone gives NaN there."""

    def attn(q, k, v, bias, masked):
        s = (q @ k.mT * 0.3 + bias).masked_fill(masked, torch.finfo(torch.float32).min)
        return torch.softmax(s, -1) @ v

    inputs = (*_qkv(), torch.randn(1, 4, 16, 16) * 0.1, _padding(additive=False))
    _check(attn, inputs, grad_args=(0, 1, 2, 3))


# ----------------------------------------------------------------------------------- soft-capping


def gemma2_softcap(q, k, v, cap: float = 20.0):
    s = q @ k.transpose(2, 3) * E**-0.5
    s = torch.tanh(s / cap) * cap
    s = s + torch.triu(torch.full((16, 16), float("-inf")), 1)
    return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("inductor", [False, True], ids=["rewrite_only", "inductor"])
def test_soft_capped_scores_run_as_a_flex_score_mod(inductor):
    q, k, v = (torch.randn(2, 4, 16, 16) * 3 for _ in range(3))  # large scores: the cap matters
    with torch.no_grad():
        cap = _check(gemma2_softcap, (q, k, v), inductor=inductor)
    info = cap.report.candidates[0].info
    assert cap.report.candidates[0].target == "flex" and info["mask"] == "flex:causal", info
    assert info["score_mod"] == "softcap(20.0)"


def test_soft_capping_in_a_tiny_gemma2_with_sliding_window_layers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
        attn_logit_softcapping=50.0, attn_implementation="eager",
    )
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        out, cap = compile_capture(lambda i: model(input_ids=i, use_cache=False).logits, (ids,), strict=True)
        ref = double_copy(model)(input_ids=ids, use_cache=False).logits
        eager = model(input_ids=ids, use_cache=False).logits
    assert [c.info["mask"] for c in cap.report.candidates] == ["flex:sliding_window_8", "flex:causal"]
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), "logits")


def test_soft_capping_where_flex_cannot_run_is_refused_naming_the_tanh():
    q, k, v = (torch.randn(2, 4, 16, 16, requires_grad=True) for _ in range(3))  # CPU training: no Flex backward
    out, cap = compile_capture(gemma2_softcap, (q, k, v), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.SOFTCAP_NEEDS_FLEX and "tanh" in cand.detail, cand
    torch.testing.assert_close(out, gemma2_softcap(q, k, v))


def test_a_tanh_that_is_not_soft_capping_is_refused_naming_it():
    def attn(q, k, v):
        return torch.softmax(torch.tanh(q @ k.mT / 20.0) * 10.0, -1) @ v

    _, cap = compile_capture(attn, _qkv(), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.reject is Reject.SCORE_OP_UNSUPPORTED and "tanh" in cand.detail, cand


def test_an_in_place_op_that_would_promote_out_of_place_is_left_in_place():
    def attn(q, k, v, bias):
        s = q @ k.mT
        s += bias  # float64 bias: in place keeps float32, out of place would give float64
        return torch.softmax(s * 0.3, -1) @ v, s.sum()  # the scores escape: the site is refused

    inputs = (*_qkv(), torch.randn(16, 16, dtype=torch.float64))
    out, cap = compile_capture(attn, inputs, inductor=False, strict=True)
    assert cap.report.candidates[0].status == "refused"
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out, attn(*inputs))
