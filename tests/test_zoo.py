"""Every zoo case: the rewrite fires (or is refused) as expected, the numbers match, and backward matches."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import asam_compile
from asam_compile import Reject
from asam_compile.kernels.adaptive import is_adaptive_call
from helpers import (
    assert_close_to_ref,
    assert_no_worse,
    candidate_summary,
    count_sdpa,
    count_softmax,
    double_copy,
    input_grads,
    max_abs_err,
    sdpa_arg,
    sdpa_nodes,
    softmax_matmul_sites,
    to_double,
)
from zoo import ZOO, ZooCase, log_softmax_count

CASES = [pytest.param(c, id=c.name) for c in ZOO]
TRAIN_CASES = [pytest.param(c, id=c.name) for c in ZOO if c.train_ok]


def compile_capture(model, inputs, **options):
    """Compile with the asam backend (strict unless told otherwise), run once, return (output, capture)."""
    options = {"strict": True, **options}
    compiled = torch.compile(model, backend="asam", options=options, fullgraph=True)
    with asam_compile.capture() as cap:
        out = compiled(*inputs)
    return out, cap


def grad_argnums(case: ZooCase, inputs) -> list[int]:
    if case.grad_argnums is not None:
        return list(case.grad_argnums)
    return [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def check_decision(case: ZooCase, cap) -> None:
    """The report and the final graphs say what the case expects."""
    cands = [c for r in cap.reports for c in r.candidates]
    msg = f"{case.name}: candidates:\n{candidate_summary(cands)}"
    assert len(cap.graphs) >= 1, "no graph reached the asam backend"
    assert all(not r.failures for r in cap.reports), f"pass failures: {[r.failures for r in cap.reports]}"
    assert len(cands) == case.n_sites, msg
    if case.expect == "sdpa":
        for c in cands:
            assert c.status == "rewritten", msg
            assert c.target == "sdpa", msg
            assert c.reject is None, msg
            if case.is_causal is not None:
                assert c.info["is_causal"] is case.is_causal, msg
            if case.enable_gqa is not None:
                assert c.info["enable_gqa"] is case.enable_gqa, msg
            if case.mask is not None:
                # "dense:<name>" where a runtime mask was planned for Flex and SDPA won
                assert c.info["mask"].split(":")[0] == case.mask, msg
            if case.scale is not None:
                # The report rounds the scale for display (6 significant digits).
                assert c.info["scale"] == pytest.approx(case.scale, rel=1e-5), msg
            # Eval mode: dropout is off, and SDPA must not be asked for any.
            assert c.info["dropout_p"] == 0.0, msg
            if c.info["is_causal"]:
                assert c.info["mask"] == "causal", msg
        assert cap.n_rewritten == case.n_sites, msg
        assert count_sdpa(cap.graphs) == case.n_sites, msg
        # The graph says what the report says: causal, GQA and dense-mask calls, counted both ways.
        nodes = sdpa_nodes(cap.graphs)
        assert sum(bool(sdpa_arg(n, "is_causal")) for n in nodes) == sum(c.info["is_causal"] for c in cands), msg
        assert sum(bool(sdpa_arg(n, "enable_gqa")) for n in nodes) == sum(c.info["enable_gqa"] for c in cands), msg
        assert sum(sdpa_arg(n, "attn_mask") is not None for n in nodes) == sum(
            c.info["mask"].split(":")[0] == "dense" for c in cands
        ), msg
        for n in nodes:
            assert not (sdpa_arg(n, "is_causal") and sdpa_arg(n, "attn_mask") is not None), "SDPA forbids both"
        assert count_softmax(cap.graphs) == 0, f"a softmax is left in the rewritten graph\n{msg}"
        assert softmax_matmul_sites(cap.graphs) == [], msg
    elif case.expect in ("flex", "adaptive"):
        for c in cands:
            assert c.status == "rewritten" and c.target == case.expect and c.reject is None, msg
        assert cap.n_rewritten == case.n_sites, msg
        assert count_softmax(cap.graphs) == 0 and count_sdpa(cap.graphs) == 0, msg
        calls = [n for g in cap.graphs for n in g.graph.nodes if n.op == "call_function" and is_adaptive_call(n)]
        assert len(calls) == (case.n_sites if case.expect == "adaptive" else 0), msg
    else:
        assert case.expect == "refused"
        expected = Reject[case.reject]
        for c in cands:
            assert c.status == "refused", msg
            assert c.target is None, msg
            assert c.reject is expected, msg
            assert c.reason and expected.value in c.reason, msg
        assert cap.n_rewritten == 0, msg
        assert count_sdpa(cap.graphs) == 0, msg
        remaining = count_softmax(cap.graphs) + sum(log_softmax_count(g) for g in cap.graphs)
        assert remaining == case.n_sites, f"a refused candidate's softmax was changed\n{msg}"


@pytest.mark.parametrize("case", CASES)
def test_zoo_decision(case: ZooCase):
    """(a) Fires or refuses exactly as the case says; the graph handed on has SDPA in place of softmax."""
    model, inputs = case.make_model().eval(), case.make_inputs()
    with torch.no_grad():
        # inductor=False: the graph after our passes runs as Python, which keeps this test fast.
        _, cap = compile_capture(model, inputs, inductor=False, **dict(case.options))
    check_decision(case, cap)


@pytest.mark.parametrize("case", CASES)
def test_zoo_numerics(case: ZooCase):
    """(b) Through Inductor, the float32 result is as close to a float64 run of the original as eager float32."""
    model, inputs = case.make_model().eval(), case.make_inputs()
    with torch.no_grad():
        ref = double_copy(model)(*to_double(inputs))
        eager = model(*inputs)
        out, cap = compile_capture(model, inputs, **dict(case.options))
    err_eager, err_asam = max_abs_err(eager, ref), max_abs_err(out, ref)
    assert_no_worse(err_asam, err_eager, case.name)
    assert_close_to_ref(out, ref)
    assert cap.n_rewritten == (case.n_sites if case.expect != "refused" else 0)
    if case.expect == "refused":
        # Inductor's own attention pass would rewrite some near misses wrongly (pytorch issue 196468):
        # the asam backend keeps it off the graphs it compiles.
        assert counters["inductor"]["fuse_attention"] == 0


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_zoo_backward(case: ZooCase):
    """(c) Gradients w.r.t. the inputs, through Inductor, match a float64 run of the original."""
    model, inputs = case.make_model().eval(), case.make_inputs()
    argnums = grad_argnums(case, inputs)
    ref, weights = input_grads(double_copy(model), to_double(inputs), argnums)
    eager, _ = input_grads(model, inputs, argnums, weights)
    compiled = torch.compile(model, backend="asam", options={"strict": True, **dict(case.options)}, fullgraph=True)
    with asam_compile.capture() as cap:
        grads, _ = input_grads(compiled, inputs, argnums, weights)
    # Flex has no backward on the CPU: a "flex" case is refused (and exact) in training there
    assert cap.n_rewritten == (case.n_sites if case.expect == "sdpa" else 0)
    for i, g, g_eager, g_ref in zip(argnums, grads, eager, ref):
        assert g is not None, f"no gradient for input {i}"
        assert_no_worse(max_abs_err(g, g_ref), max_abs_err(g_eager, g_ref), f"{case.name}: grad of input {i}")
        assert_close_to_ref(g, g_ref)


def test_zoo_has_one_near_miss_per_listed_reason():
    """The zoo covers the rejection reasons the brief lists (one negative test per reason)."""
    reasons = {c.reject for c in ZOO if c.expect == "refused"}
    for name in ("SOFTMAX_NOT_LAST_DIM", "LOG_SOFTMAX", "PROBS_ESCAPE", "SCALE_NOT_SCALAR", "PROBS_CHANGED",
                 "SCORES_ESCAPE"):
        assert name in reasons
    for name in reasons:
        assert name in Reject.__members__, f"zoo names a Reject member that does not exist: {name}"


def test_inductor_alone_fuses_a_near_miss():
    """Control for test_zoo_numerics: plain Inductor does run its attention pass on a near miss.

    Without this, `counters["inductor"]["fuse_attention"] == 0` could pass because the counter never moves.
    """
    from zoo import ZOO_BY_NAME

    case = ZOO_BY_NAME["near_softmax_dim_minus2"]
    model, inputs = case.make_model().eval(), case.make_inputs()
    with torch.no_grad():
        torch.compile(model, backend="inductor", fullgraph=True)(*inputs)
    if counters["inductor"]["fuse_attention"] == 0:
        pytest.skip("Inductor's fuse_attention did not fire on this torch build; the control is moot")
