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
