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
    from asam_compile.kernels.selection import reference, select_blocks

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
    # a graph that needs gradients takes the in-graph call, not the measured dispatch (Note [Dispatch by measured
    # density])
    targets = {n.target for g in cap.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert torch.ops.asam.adaptive_dispatch.default not in targets, targets
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
    from asam_compile.config import SparseSettings
    from asam_compile.kernels.selection import reference
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
    from asam_compile.config import SparseSettings
    from asam_compile.kernels.selection import select
    from test_adaptive import CausalAttention, mixed_heads

    q, k, v = (x.cuda() for x in mixed_heads(L=2048))
    settings = SparseSettings(128, 0.8, 0.5, 0, 1, 1)
    dense = select(q.bfloat16(), k.bfloat16(), scale=32**-0.5, causal=True, settings=settings)[3]
    assert dense.tolist() == [[False, False, True, True], [True, True, False, False]], dense
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 0.5, "window": 1, "sinks": 1,
            "dense_fallback": True, "strict": True}
    check_adaptive_bf16_against_reference(CausalAttention(), opts, settings, (q, k, v), 32**-0.5, "mixed")


# ------------------------------------------------------------------------ Flex (structured and runtime masks) on CUDA


def _grads_bf16_vs_float64(model, compiled, inputs, label, n_grad=3):
    """Output and the gradients of the first n_grad inputs: compiled bf16 no worse than eager bf16, both
    against float64 (on the output elements where float64 is finite)."""
    def run(fn, dtype):
        xs = [x.to(dtype).detach().requires_grad_() if i < n_grad else x for i, x in enumerate(inputs)]
        out = fn(*xs)
        out.float().nan_to_num().pow(2).sum().backward()
        return out.detach().double(), [x.grad.double() for x in xs[:n_grad]]

    ref_out, ref_g = run(model, torch.float64)
    eager_out, eager_g = run(model, torch.bfloat16)
    out, g = run(compiled, torch.bfloat16)
    ok = ref_out.isfinite()
    assert_no_worse((out - ref_out)[ok].abs().max().item(), (eager_out - ref_out)[ok].abs().max().item(),
                    f"{label} forward", slack=1e-3)
    for i, (a, r, b) in enumerate(zip(g, ref_g, eager_g)):
        assert_no_worse(max_abs_err(a, r), max_abs_err(b, r), f"{label} grad {i}", slack=1e-2)


class CudaSlidingWindow(torch.nn.Module):
    """Sliding-window attention as HF's eager Mistral path writes it, with its index tensors on q's device."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        q_idx = torch.arange(q.shape[-2], device=q.device)[None, None, :, None]
        kv_idx = torch.arange(k.shape[-2], device=q.device)[None, None, None, :]
        keep = (kv_idx <= q_idx) & (kv_idx > q_idx - self.window)
        mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype, device=q.device), torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def test_gpu_flex_sliding_window_training_bf16():
    """A compile-time sliding window on Flex (flex='always'), forward and backward in bf16 on the GPU, at a
    length that is not a multiple of the block size."""
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(2, 4, 1000, 64, device="cuda", generator=g) for _ in range(3)]
    model = CudaSlidingWindow(200)
    compiled = torch.compile(model, backend="asam", options={"strict": True, "flex": "always"}, fullgraph=True)
    with asam_compile.capture() as cap:
        _grads_bf16_vs_float64(model, compiled, inputs, "sliding window")
    assert [c.target for c in cap.report.candidates] == ["flex"], candidate_summary(cap.report.candidates)


def test_gpu_runtime_padding_mask_training_bf16():
    """Causal attention with a runtime padding vector (left padding: rows with no key, which eager averages):
    the block mask is built in the graph; forward and backward in bf16 no worse than eager against float64."""
    from test_runtime_masks import CausalKeyFill

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", generator=g) for _ in range(3))
    keep = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    keep[1, :300] = False
    model = CausalKeyFill(torch.finfo(torch.float32).min)
    compiled = torch.compile(model, backend="asam", options={"strict": True, "flex": "always"}, fullgraph=True)
    with asam_compile.capture() as cap:
        _grads_bf16_vs_float64(model, compiled, [q, k, v, keep], "runtime padding")
    (cand,) = cap.report.candidates
    assert cand.target == "flex" and "built in the graph" in cand.info["kernel"], cand.info


def test_gpu_hf_llama_left_padding_bf16():
    """An HF Llama with a left-padded batch on the GPU: Flex with the in-graph block mask on both layers,
    logits no worse than eager bf16 against float64 (on rows where float64 is finite)."""
    from test_runtime_masks import logits, padding, small_llama

    model = small_llama().cuda()
    ids = torch.randint(0, 128, (2, 700), device="cuda")
    am = padding(2, 700, left=(0, 250)).cuda()
    with torch.no_grad():
        ref = logits(copy.deepcopy(model).double()(input_ids=ids, attention_mask=am))
        model = model.bfloat16()
        eager = logits(model(input_ids=ids, attention_mask=am)).double()
        with asam_compile.capture() as cap:
            out = logits(torch.compile(model, backend="asam", options={"strict": True, "flex": "always"})(
                input_ids=ids, attention_mask=am)).double()
    assert [c.target for c in cap.report.candidates] == ["flex", "flex"], candidate_summary(cap.report.candidates)
    ok = ref.isfinite()
    assert_no_worse((out - ref)[ok].abs().max().item(), (eager - ref)[ok].abs().max().item(), "llama padding", slack=1e-2)


def test_gpu_flex_dynamic_shapes_and_three_d_bf16():
    """Flex under dynamic shapes (block mask built in the graph per length) and a 3-D (N, L, E) window site, in
    bf16 on the GPU: outputs no worse than eager bf16 against float64."""
    from test_flex import ThreeDWindow

    class CudaThreeDWindow(ThreeDWindow):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[-2], device=q.device)
            far = (i[None, :] - i[:, None]).abs() > 100
            att = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
            return torch.bmm(att.masked_fill(far, float("-inf")).softmax(-1), v)

    g = torch.Generator(device="cuda").manual_seed(0)
    opts = {"strict": True, "flex": "always"}
    window = CudaSlidingWindow(150)
    compiled = torch.compile(window, backend="asam", options=opts, dynamic=True)
    with torch.no_grad(), asam_compile.capture() as cap:
        for L in (600, 1000, 1300):
            q, k, v = (torch.randn(1, 4, L, 64, device="cuda", generator=g) for _ in range(3))
            ref = window(q.double(), k.double(), v.double())
            out, eager = compiled(*(x.bfloat16() for x in (q, k, v))), window(*(x.bfloat16() for x in (q, k, v)))
            assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), f"dynamic window L={L}", slack=1e-3)
    assert len(cap.graphs) <= 2 and all(c.target == "flex" for c in cap.report.rewritten), cap.report
    three_d = CudaThreeDWindow()
    q, k, v = (torch.randn(8, 700, 64, device="cuda", generator=g) for _ in range(3))
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(three_d, backend="asam", options=opts)(*(x.bfloat16() for x in (q, k, v)))
        eager = three_d(*(x.bfloat16() for x in (q, k, v)))
    assert [c.target for c in cap.report.rewritten] == ["flex"], cap.report
    ref = three_d(q.double(), k.double(), v.double())
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), "3-D window", slack=1e-3)


def test_gpu_adaptive_batch_two_inference_and_inside_a_padding_mask_bf16():
    """In-graph adaptive inference with a batch of 2 (the case that crashed Inductor's Flex template for runtime
    masks: Note [Block tables leave the graph through an opaque op]), causal and inside a run-time padding mask
    (Note [Adaptive over a structured mask]); then forward and backward inside a right-padding mask. Each is
    judged against float64 of the same kept blocks, no worse than that program in bf16."""
    from test_adaptive import CausalAttention, planted
    from test_runtime_masks import MaskedAttention, adaptive_reference

    from asam_compile.config import SparseSettings
    from asam_compile.kernels.selection import reference

    q, k, v = (x.cuda() for x in planted(B=2, H=4, L=2048, E=64))
    # the in-graph call (the measured dispatch would send a 2k site to SDPA: Note [When sparse heads pay])
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 1.0, "window": 1, "sinks": 1,
            "block_size": 128, "strict": True, "dense_fallback": "none"}
    settings = SparseSettings(128, 0.8, 1.0, 0, 1, 1)
    bq, bk, bv = (x.bfloat16() for x in (q, k, v))
    with torch.no_grad(), asam_compile.capture() as cap:
        out = torch.compile(CausalAttention(), backend="asam", options=opts)(bq, bk, bv)
        ref, density = reference(bq.double(), bk.double(), bv.double(), scale=64**-0.5, causal=True, settings=settings)
        bf, _ = reference(bq, bk, bv, scale=64**-0.5, causal=True, settings=settings)
    assert [c.target for c in cap.report.candidates] == ["adaptive"] and density < 0.6
    assert_no_worse(max_abs_err(out.double(), ref), max_abs_err(bf.double(), ref), "causal batch 2", slack=2e-3)

    kq, kk, kv = q, k[:, ::2].contiguous(), v[:, ::2].contiguous()
    for side in ("left", "right"):
        keep = torch.ones(2, 2048, dtype=torch.bool, device="cuda")
        if side == "left":
            keep[1, :300] = False
        else:
            keep[1, 1700:] = False
        model = MaskedAttention("padding")
        xs = [x.bfloat16().detach().requires_grad_(side == "right") for x in (kq, kk, kv)]
        torch._dynamo.reset()
        with torch.enable_grad() if side == "right" else torch.no_grad(), asam_compile.capture() as cap:
            out = torch.compile(model, backend="asam", options=opts)(*xs, keep)
        assert [c.target for c in cap.report.candidates] == ["adaptive"], candidate_summary(cap.report.candidates)
        xd = [x.detach().double().requires_grad_(side == "right") for x in xs]
        with torch.enable_grad() if side == "right" else torch.no_grad():
            ref, density = adaptive_reference(model, *xd, keep, settings)
        assert density < 0.7, density
        assert torch.equal(out.isnan(), ref.isnan()), side
        ok = ~ref.isnan()
        err = (out.double() - ref).where(ok, 0).abs().max().item()
        assert err < 0.05, (side, err)
        if side == "right":
            out.float().pow(2).sum().backward()
            ref.pow(2).sum().backward()
            for i, (a, r) in enumerate(zip(xs, xd)):
                e = (a.grad.double() - r.grad).abs().max().item() / r.grad.abs().max().item()
                assert e < 0.05, (i, e)


@pytest.mark.parametrize("flex", ["always", "never", "adaptive"])
def test_gpu_hf_llama_left_padding_training_gradients_match_eager(flex):
    """Left padding leaves query rows with no key under HF's additive finfo.min mask: the original's gradients
    there are a uniform softmax's (Note [Gradients of fully masked rows]); the in-graph Flex block mask
    (flex='always'), dense SDPA (flex='never') and the adaptive call inside the padding mask (at 300 tokens its
    window and sink keep every block, so it is exact) must all give them, float32 on CUDA."""
    from test_runtime_masks import padding, small_llama

    model = small_llama().cuda()
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    am = padding(2, 300, left=(0, 120)).cuda()

    def grads(m):
        model.zero_grad()
        out = m(input_ids=ids, attention_mask=am, use_cache=False).logits
        (out * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = grads(model)
    opts = {"strict": True, "flex": "always" if flex == "adaptive" else flex}
    if flex == "adaptive":
        opts.update(mode="adaptive", min_seq_len=0)
    with asam_compile.capture() as cap:
        compiled = grads(torch.compile(model, backend="asam", options=opts))
    target = {"always": "flex", "never": "sdpa", "adaptive": "adaptive"}[flex]
    assert [c.target for c in cap.report.candidates] == [target, target], candidate_summary(cap.report.candidates)
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, atol=1e-3, rtol=1e-2, msg=name)


def test_measured_dispatch_reads_nothing_back_after_calibration(monkeypatch):
    """Note [Dispatch by measured density]: once a bucket is calibrated, a call launches its kernels without a
    host synchronisation (torch.cuda.set_sync_debug_mode("error") raises on one), and the split follows the
    densities: planted heads sparse, flat heads on SDPA, each equal to its reference."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels import cost, dispatch, selection
    from asam_compile.models import planted_qkv

    # at 8k the split would otherwise be all SDPA
    monkeypatch.setattr(cost, "SPARSE_CALL_OVERHEAD_S", {"flex": 0.0, "triton": 0.0})

    q, k, v = planted_qkv(1, 2, 8192, 128, 4, "cuda", torch.bfloat16)
    q = q.repeat_interleave(2, dim=1).clone()
    q[:, 2:] = 0  # heads 2, 3 flat: every block keeps mass
    site = dispatch.new_site("gpu_test")
    args = (q, k, v, 128**-0.5, True, site, 128, 0.9, 0.5, 2, 1)
    for _ in range(3):  # two calibration calls, then a steady one (compiles)
        torch.ops.asam.adaptive_dispatch(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.asam.adaptive_dispatch(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    (bucket,) = dispatch.decisions()[site].values()
    assert bucket["sparse"] == (0, 1), bucket
    exact = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    torch.testing.assert_close(out[:, 2:], exact[:, 2:], atol=2e-2, rtol=2e-2)
    st = SparseSettings(128, 0.9, 0.5, 0, 2, 1)
    kept = selection.select_blocks(q[:, :2], k[:, :1], scale=128**-0.5, causal=True, settings=st)[0]  # as the op
    ref, _ = selection.reference(q[:, :2].float(), k[:, :1].float(), v[:, :1].float(), scale=128**-0.5, causal=True,
                                 settings=st, kept=kept)
    assert (out[:, :2].float() - ref).abs().max() < 2e-2
    assert (out[:, :2].float() - exact[:, :2].float()).abs().max() > 1e-3, "the planted heads should run sparse"


def test_in_graph_adaptive_inference_runs_the_triton_kernel_inside_the_compiled_graph(monkeypatch):
    """Note [The kernel inside compiled graphs]: with dense_fallback='none', a compiled inference graph runs the
    adaptive call on asam::block_sparse_attention (traced, not opaque), equal to the dense reference of the
    same kept blocks; a training graph of the same module keeps Flex (the kernel has no backward)."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels import adaptive
    from asam_compile.kernels.selection import reference, select_blocks
    from test_adaptive import CausalAttention, planted

    calls = []
    real = adaptive.triton_on_blocks
    monkeypatch.setattr(adaptive, "triton_on_blocks", lambda *a: calls.append(1) or real(*a))
    torch.compiler.reset()
    q, k, v = (x.cuda().bfloat16() for x in planted(H=4, L=2048, E=64))
    # coverage 0.8: the planted block and the forced ones reach it with a wide margin (as in
    # test_gpu_adaptive_forward_and_backward_bf16), so the graph's selection and this one agree
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 1.0, "window": 1, "sinks": 1,
            "dense_fallback": "none", "strict": True}
    with torch.no_grad():
        out = torch.compile(CausalAttention(), backend="asam", options=opts)(q, k, v)
    assert calls, "the inference graph did not take the Triton kernel"
    settings = SparseSettings(128, 0.8, 1.0, 0, 1, 1)
    kept, _, allowed = select_blocks(q, k, scale=64**-0.5, causal=True, settings=settings)
    assert kept.sum() < 0.6 * allowed.expand_as(kept).sum()
    ref, _ = reference(q.double(), k.double(), v.double(), scale=64**-0.5, causal=True, settings=settings, kept=kept)
    assert (out.double() - ref).abs().max() < 2e-2
    calls.clear()
    torch.compiler.reset()
    qg = q.detach().requires_grad_()
    torch.compile(CausalAttention(), backend="asam", options=opts)(qg, k, v).sum().backward()
    assert not calls and qg.grad is not None and qg.grad.isfinite().all()


def test_in_graph_triton_adaptive_under_dynamic_shapes():
    """The Triton op inside a graph compiled with dynamic shapes: two lengths through one compiled module, each
    equal to the dense reference of its own kept blocks (Note [Adaptive under dynamic shapes])."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels.selection import reference, select_blocks
    from test_adaptive import CausalAttention, planted

    torch.compiler.reset()
    opts = {"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "max_density": 1.0, "window": 1, "sinks": 1,
            "dense_fallback": "none", "strict": True}
    model = torch.compile(CausalAttention(), backend="asam", options=opts, dynamic=True)
    settings = SparseSettings(128, 0.8, 1.0, 0, 1, 1)
    for L in (2048, 2560):
        q, k, v = (x.cuda().bfloat16() for x in planted(H=4, L=L, E=64))
        with torch.no_grad():
            out = model(q, k, v)
        kept = select_blocks(q, k, scale=64**-0.5, causal=True, settings=settings)[0]
        ref, _ = reference(q.double(), k.double(), v.double(), scale=64**-0.5, causal=True, settings=settings,
                           kept=kept)
        assert (out.double() - ref).abs().max() < 2e-2, L
