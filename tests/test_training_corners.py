"""Training corners: every rewrite keeps the original's gradients, and nothing that trains is read as a constant."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import compile_capture, input_grads, max_abs_err, to_double

FMIN = torch.finfo(torch.float32).min


def _assert_grads_no_worse(fn, compiled, inputs, argnums, factor=4.0, slack=1e-5):
    """The compiled gradients are no further from the float64 original's than the float32 original's are."""
    ref, weights = input_grads(fn, to_double(inputs), argnums)
    eager, _ = input_grads(fn, inputs, argnums, weights)
    new, _ = input_grads(compiled, inputs, argnums, weights)
    for i, (r, e, n) in zip(argnums, zip(ref, eager, new)):
        err_new, err_eager = max_abs_err(n, r), max_abs_err(e, r)
        assert err_new <= factor * err_eager + slack, f"grad of input {i}: {err_new:.3g} vs eager {err_eager:.3g}"


class LearnedBias(nn.Module):
    """A relative-position bias initialised to zero, as Swin and BEiT do."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 4, 16, 16))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.mT * 0.25 + self.bias, -1) @ v


def test_a_zero_initialised_parameter_bias_is_a_runtime_tensor_that_trains():
    model = LearnedBias()
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    out, cap = compile_capture(model, (q, k, v), inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "rewritten" and cand.info["mask"] == "dense", cand.info
    assert out.requires_grad
    out.sum().backward()
    grad_compiled = model.bias.grad.clone()
    model.bias.grad = None
    model(q, k, v).sum().backward()
    torch.testing.assert_close(grad_compiled, model.bias.grad, atol=1e-5, rtol=1e-4)


def test_a_parameter_bias_changed_by_an_optimizer_step_is_seen_without_a_recompile():
    model = LearnedBias()
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    compiled = torch.compile(model, backend="asam", options={"strict": True})
    compiled(q, k, v)
    with torch.no_grad():
        model.bias.normal_()
    expect = model(q, k, v)
    assert max_abs_err(compiled(q, k, v), expect) < 1e-5
    model.load_state_dict({"bias": torch.randn(1, 4, 16, 16)})
    assert max_abs_err(compiled(q, k, v), model(q, k, v)) < 1e-5


def test_a_buffer_is_still_trusted_as_a_constant_causal_mask():
    class Tril(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("tril", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

        def forward(self, q, k, v):
            s = (q @ k.mT * 0.3).masked_fill(self.tril == 0, float("-inf"))
            return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    _, cap = compile_capture(Tril(), (q, k, v), inductor=False, strict=True)
    assert cap.report.candidates[0].info["is_causal"] is True


def _hf_attention(q, k, v, mask):
    """HF's eager attention: matmul * scaling + additive mask, float32 softmax, matmul."""
    s = torch.matmul(q, k.transpose(2, 3)) * 0.35 + mask
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)


def _left_padded_causal_mask(B=2, L=6, pad=3, dtype=torch.float32):
    keep = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None].repeat(B, 1, 1, 1)
    keep[1, :, :, :pad] = False  # left padding: the first `pad` queries of row 1 have no key at all
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


@pytest.mark.parametrize("inductor", [False, True], ids=["rewrite_only", "inductor"])
def test_gradients_of_rows_an_additive_finfo_min_mask_removes_entirely_match_the_original(inductor):
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    mask = _left_padded_causal_mask()
    compiled = torch.compile(_hf_attention, backend="asam", options={"strict": True, "inductor": inductor})
    import asam_compile

    with asam_compile.capture() as cap:
        _assert_grads_no_worse(_hf_attention, compiled, (q, k, v, mask), (0, 1, 2))
    assert cap.n_rewritten >= 1


def test_gradients_of_a_learned_additive_bias_over_fully_masked_rows_match_the_original():
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    bias = torch.randn(2, 2, 6, 6) * 0.1 + _left_padded_causal_mask()
    compiled = torch.compile(_hf_attention, backend="asam", options={"strict": True, "inductor": False})
    _assert_grads_no_worse(_hf_attention, compiled, (q, k, v, bias), (0, 1, 2, 3))


def test_a_row_masked_by_a_fill_keeps_zero_query_gradients_like_the_original():
    def fill_attention(q, k, v, keep):
        s = (q @ k.mT * 0.35).masked_fill(~keep, FMIN)
        return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    keep = _left_padded_causal_mask() == 0
    compiled = torch.compile(fill_attention, backend="asam", options={"strict": True, "inductor": False})
    _assert_grads_no_worse(fill_attention, compiled, (q, k, v, keep), (0, 1, 2))


def test_left_padded_hf_llama_training_gradients_match_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 10))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, :4] = 0

    def loss_grads(m):
        m.zero_grad()
        logits = m(input_ids=ids, attention_mask=attn, use_cache=False).logits
        (logits * torch.linspace(-1, 1, 64)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = loss_grads(model)
    import asam_compile

    with asam_compile.capture() as cap:
        compiled = loss_grads(torch.compile(model, backend="asam", options={"strict": True}))
    assert cap.n_rewritten == 2, cap.report
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, atol=2e-4, rtol=2e-3, msg=name)
