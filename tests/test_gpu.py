"""GPU tests: zoo cases in half precision on CUDA, judged against a float64 run of the original."""

from __future__ import annotations

import copy

import pytest
import torch

import asam_compile
from helpers import assert_no_worse, candidate_summary, double_copy, max_abs_err, to_double
from zoo import ZOO_BY_NAME

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU_CASES = [
    "matmul_transpose",
    "einsum_blhd",
    "additive_padding_b11s",
    "nanogpt_causal_buffer",
    "hf_index_causal",
    "repeat_kv_causal",
    "softmax_fp32_then_to",
    "hf_llama_gqa",
    "hf_bert_padding",
    "near_softmax_dim_minus2",
]


def _to(x, device, dtype=None):
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device, dtype) for v in x)
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_half_precision(name, dtype):
    case = ZOO_BY_NAME[name]
    model = case.make_model().eval().cuda()
    inputs = _to(case.make_inputs(), "cuda")
    with torch.no_grad():
        ref = double_copy(model)(*to_double(inputs))
        model_lp, inputs_lp = copy.deepcopy(model).to(dtype), _to(inputs, "cuda", dtype)
        eager = model_lp(*inputs_lp)
        compiled = torch.compile(model_lp, backend="asam", options={"strict": True}, fullgraph=True)
        with asam_compile.capture() as cap:
            out = compiled(*inputs_lp)
    expected = case.n_sites if case.expect == "sdpa" else 0
    assert cap.n_rewritten == expected, candidate_summary(cap.report.candidates)
    assert out.dtype == eager.dtype == dtype
    err, err_eager = max_abs_err(out, ref), max_abs_err(eager, ref)
    assert_no_worse(err, err_eager, f"{name} {dtype}", slack=1e-3)


@pytest.mark.parametrize("name", ["nanogpt_causal_buffer", "repeat_kv_causal", "hf_llama_gqa"])
def test_gpu_backward_bf16(name):
    from helpers import input_grads

    case = ZOO_BY_NAME[name]
    model = case.make_model().eval().cuda()
    inputs = _to(case.make_inputs(), "cuda")
    argnums = [i for i, x in enumerate(inputs) if x.is_floating_point()]
    ref, w = input_grads(double_copy(model), to_double(inputs), argnums)
    model_lp, inputs_lp = copy.deepcopy(model).to(torch.bfloat16), _to(inputs, "cuda", torch.bfloat16)
    eager, _ = input_grads(model_lp, inputs_lp, argnums, w)
    compiled = torch.compile(model_lp, backend="asam", options={"strict": True}, fullgraph=True)
    with asam_compile.capture() as cap:
        grads, _ = input_grads(compiled, inputs_lp, argnums, w)
    assert cap.n_rewritten == case.n_sites
    for i, g, ge, gr in zip(argnums, grads, eager, ref):
        assert_no_worse(max_abs_err(g, gr), max_abs_err(ge, gr), f"{name}: grad of input {i}", slack=1e-2)


# ------------------------------------------------------------------------ adaptive sparse mode on CUDA


def check_adaptive_bf16_against_reference(model, opts, settings, qkv_, scale, label):
    """Compile `model` with `opts`, run it in bf16 with gradients, and check that its one site went adaptive and
    that its output and the three gradients are no worse, against float64, than the same dense-masked program
    (the kept blocks as a boolean SDPA mask) run in bf16."""
    from asam_compile.adaptive import reference, select_blocks

    q, k, v = qkv_
    compiled = torch.compile(model, backend="asam", options=opts, fullgraph=True)

    def grads(fn, dtype):
        xs = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.float().pow(2).sum().backward()
        return out.detach().double(), [x.grad.double() for x in xs]

    with asam_compile.capture() as cap:
        out, g = grads(compiled, torch.bfloat16)
    assert [c.target for c in cap.report.candidates] == ["adaptive"], candidate_summary(cap.report.candidates)
    kept = select_blocks(q.bfloat16(), k.bfloat16(), scale=scale, causal=True, settings=settings)[0]

    def ref_fn(*xs):
        return reference(*xs, scale=scale, causal=True, settings=settings, kept=kept)[0]

    ref_out, ref_g = grads(ref_fn, torch.float64)
    bf_out, bf_g = grads(ref_fn, torch.bfloat16)  # the same dense-masked program in bf16: the error budget
    assert_no_worse(max_abs_err(out, ref_out), max_abs_err(bf_out, ref_out), f"{label} forward", slack=1e-3)
    for i, (a, r, b) in enumerate(zip(g, ref_g, bf_g)):
        assert_no_worse(max_abs_err(a, r), max_abs_err(b, r), f"{label} grad {i}", slack=1e-3)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_gpu_adaptive_forward_and_backward_bf16(gqa):
    """The compiled block-sparse kernel equals dense attention restricted to the kept blocks (forward and
    gradients, bf16, judged against float64), and the selection is really sparse."""
    from asam_compile.adaptive import SparseSettings, reference
    from test_adaptive import CausalAttention, planted

    q, k, v = (x.cuda() for x in planted(H=4, L=2048, E=64))
    if gqa:
        k, v = k[:, ::2].contiguous(), v[:, ::2].contiguous()
    # coverage 0.8: the planted block and the forced ones reach it with a wide margin, so bf16 and float64
    # select the same blocks (the test compares kernels, not selections)
    settings = SparseSettings(128, 0.8, 1.0, 0, 1, 1)
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 1.0, "window": 1,
            "sinks": 1, "strict": True}
    check_adaptive_bf16_against_reference(CausalAttention(), opts, settings, (q, k, v), 64**-0.5, "adaptive")
    _, density = reference(q, k, v, scale=64**-0.5, causal=True, settings=settings)
    assert density < 0.6, density


def test_gpu_adaptive_mixed_pairs_forward_and_backward_bf16():
    """Note [Adaptive attention op] (dense_fallback=True) on the GPU: diffuse (batch, head) pairs run SDPA flash, the others Flex;
    forward and the three gradients (the op's backward recomputes through both kernels) are no worse than
    the same dense-masked program in bf16, judged against float64."""
    from asam_compile.adaptive import SparseSettings, _select
    from test_adaptive import CausalAttention, mixed_heads

    q, k, v = (x.cuda() for x in mixed_heads(L=2048))
    settings = SparseSettings(128, 0.8, 0.5, 0, 1, 1)
    dense = _select(q.bfloat16(), k.bfloat16(), 32**-0.5, True, settings)[3]
    assert dense.tolist() == [[False, False, True, True], [True, True, False, False]], dense
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 0.5, "window": 1, "sinks": 1,
            "dense_fallback": True, "strict": True}
    check_adaptive_bf16_against_reference(CausalAttention(), opts, settings, (q, k, v), 32**-0.5, "mixed")
