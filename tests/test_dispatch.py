"""asam::adaptive_dispatch (Note [Dispatch by measured density] in asam_compile/kernels/dispatch.py): heads whose
measured density does not pay run SDPA, the others the adaptive call, with no host read-back between measurements."""

from __future__ import annotations

import pytest
import torch

import asam_compile
from asam_compile.config import SparseSettings
from asam_compile.kernels import dispatch, selection
from test_adaptive import BS, EXACT_TOL, CausalAttention, compile_adaptive, exact, planted, qkv

SCALE = 32**-0.5


def two_kinds(L=2048):
    """Heads 0, 1 planted (concentrated), heads 2, 3 flat (q = 0), GQA with 2 kv heads."""
    q, k, v = planted(B=1, H=2, L=L)
    q = q.repeat_interleave(2, dim=1).clone()
    q[:, 2:] = 0
    return q, k, v


@pytest.fixture
def counted(monkeypatch):
    """Counts of the measurements (each one a host read-back) and of the selections run."""
    calls = {"measure": 0, "select": 0}
    measure, select = dispatch._measure, dispatch._selection

    def count_measure(*a, **kw):
        calls["measure"] += 1
        return measure(*a, **kw)

    def count_select(*a, **kw):
        calls["select"] += 1
        return select(*a, **kw)

    monkeypatch.setattr(dispatch, "_measure", count_measure)
    monkeypatch.setattr(dispatch, "_selection", count_select)
    monkeypatch.setattr(dispatch, "RECHECK_EVERY", 6)
    return calls


def call(site, inputs, max_density=0.5, coverage=0.8):
    return torch.ops.asam.adaptive_dispatch(*inputs, SCALE, True, site, BS, coverage, max_density, 1, 1)


def test_heads_split_by_measured_density_and_steady_calls_read_nothing_back(counted):
    inputs = two_kinds()
    site = dispatch.new_site("softmax")
    outs = [call(site, inputs) for _ in range(7)]
    (bucket,) = dispatch._SITES[site].values()
    assert bucket.sparse == (0, 1), bucket
    assert bucket.density[0] < 0.5 < bucket.density[2], bucket.density
    # two calibration calls, then none until call 6 (RECHECK_EVERY) measures again
    assert counted["measure"] == 3 and bucket.calls == 7
    full = exact(CausalAttention(), inputs)
    st = SparseSettings(BS, 0.8, 0.5, 0, 1, 1)
    ref, _ = selection.reference(inputs[0][:, :2], inputs[1][:, :1], inputs[2][:, :1], scale=SCALE, causal=True, settings=st)
    for out in outs[2:]:
        torch.testing.assert_close(out[:, 2:], full[:, 2:], atol=EXACT_TOL, rtol=1e-4)  # SDPA heads: exact
        torch.testing.assert_close(out[:, :2], ref, atol=EXACT_TOL, rtol=1e-4)  # sparse heads: their blocks
    assert (outs[-1][:, :2] - full[:, :2]).abs().max() > 1e-3, "the concentrated heads should run sparse"
    assert "B=1 L<=2048 S<=2048" in dispatch.decisions()[site]


def test_no_head_pays_is_plain_sdpa_without_any_selection(counted):
    inputs = qkv(L=1000, H=4, Hkv=2)
    site = dispatch.new_site("softmax")
    outs = [call(site, inputs, max_density=0.05, coverage=0.99) for _ in range(5)]
    assert counted["measure"] == 2 and counted["select"] == 2  # the calibration's selections only
    assert dispatch._SITES[site][(1, 10, 10)].sparse == ()
    for out in outs:
        torch.testing.assert_close(out, exact(CausalAttention(), inputs), atol=EXACT_TOL, rtol=1e-4)


def test_length_buckets_measure_separately(counted):
    site = dispatch.new_site("softmax")
    call(site, two_kinds(L=1024))
    call(site, two_kinds(L=2048))
    call(site, two_kinds(L=1500))  # the 2048 bucket again
    assert sorted(dispatch._SITES[site]) == [(1, 10, 10), (1, 11, 11)]
    assert counted["measure"] == 3


def test_the_default_is_measured_dispatch_and_bools_name_the_other_fallbacks():
    inputs = two_kinds()
    out, cap = compile_adaptive(CausalAttention(), inputs, coverage=0.8, window=1, sinks=1)
    targets = [n.target for gm in cap.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.asam.adaptive_dispatch.default in targets
    assert cap.report.candidates[0].info["adaptive"].endswith("dense_fallback=measured")
    # the report names the site under which dispatch.decisions() lists its measured densities and split
    (bucket,) = dispatch.decisions()[cap.report.candidates[0].info["dispatch_site"]].values()
    assert bucket["sparse"] == (0, 1) and bucket["calls"] == 1, bucket
    torch.testing.assert_close(out[:, 2:], exact(CausalAttention(), inputs)[:, 2:], atol=EXACT_TOL, rtol=1e-4)
    assert asam_compile.AsamConfig.from_options({"dense_fallback": False}).sparse.dense_fallback == "none"
    with pytest.raises(ValueError, match="dense_fallback"):
        asam_compile.AsamConfig.from_options({"dense_fallback": "sometimes"})


def test_opcheck():
    q, k, v = two_kinds(L=512)
    site = dispatch.new_site("softmax")
    torch.library.opcheck(torch.ops.asam.adaptive_dispatch.default, (q, k, v, SCALE, True, site, BS, 0.8, 0.5, 1, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_sparse_split_counts_the_sparse_paths_own_cost():
    """Note [When sparse heads pay], with the constants measured on an H200 (session 9): on Gemma-3's layer 11 at
    16k (D=256) the Triton path pays for head 0 at coverage 0.995 (measured 0.87 ms against SDPA's 0.93) and for
    heads 0 and 1 at 0.9 (0.66 ms); on Flex (0.46x SDPA's speed at D=256, 0.8 ms of eager launches a call) it
    pays for none. Planted concentrated heads (D=128, density 0.15) at 16k go sparse, all of them; off CUDA the
    split is max_density's alone."""
    from asam_compile.kernels import cost

    gemma = dict(E=256, L=16384, S=16384, causal=True, batch=1, device_type="cuda", kernel="triton")
    assert cost.sparse_split([0.33, 0.79, 0.95, 0.96], max_density=0.5, **gemma) == (0,)
    assert cost.sparse_split([0.05, 0.27, 0.65, 0.61], max_density=0.5, **gemma) == (0, 1)
    assert cost.sparse_split([0.33, 0.79, 0.95, 0.96], max_density=1.0, **dict(gemma, kernel="flex")) == ()
    planted_16k = dict(E=128, L=16384, S=16384, causal=True, batch=1, device_type="cuda", kernel="triton")
    assert cost.sparse_split([0.15] * 16, max_density=0.5, **planted_16k) == tuple(range(16))
    assert cost.sparse_split([0.15] * 16, max_density=0.5, **dict(planted_16k, kernel="flex")) == tuple(range(16))
    # a head above max_density never goes sparse; a long sequence pays for a single sparse head on Flex
    long = dict(planted_16k, L=65536, S=65536, kernel="flex")
    assert cost.sparse_split([0.9, 0.1, 0.6, 0.2], max_density=0.5, **long) == (1, 3)
    assert cost.sparse_split([0.9, 0.1, 0.6, 0.2], max_density=0.5, **dict(gemma, device_type="cpu")) == (1, 3)
    # one sparse head of 16 pays at 64k (the others run SDPA on their slice); at 1k nothing pays
    assert cost.sparse_split([0.1] + [0.9] * 15, max_density=0.5, **dict(planted_16k, L=65536, S=65536)) == (0,)
    assert cost.sparse_split([0.15] * 16, max_density=0.5, **dict(planted_16k, L=1024, S=1024)) == ()


def test_explain_shows_each_heads_density_and_choice():
    """explain() runs the model once: the measured dispatch's first measurement is in the report."""
    report = asam_compile.explain(CausalAttention(), *two_kinds(),
                                  options={"mode": "adaptive", "min_seq_len": 0, "coverage": 0.8, "window": 1})
    (cand,) = report.candidates
    assert "sparse heads [0, 1] of densities" in cand.info["dispatch"], cand.info


def test_more_head_splits_than_dynamos_recompile_limit(monkeypatch):
    """Each split shape compiles the Flex helper once; a model whose sites split their heads in more than 8 ways
    (Dynamo's default recompile limit) still runs every one compiled and exact on its kept blocks (without the
    op's raised limit, the ninth shape fell back to eager Flex, which fails inside the op: SmolLM2 at 8k on CPU)."""
    from asam_compile.kernels import cost

    H = 10
    g = torch.Generator().manual_seed(1)
    # (B, L, H, E) transposed, as HF models hand them over
    q, k, v = (torch.randn(1, 256, H, 32, generator=g).transpose(1, 2) for _ in range(3))
    torch.compiler.reset()
    for n in range(1, H):
        monkeypatch.setattr(cost, "sparse_split", lambda *a, n=n, **kw: tuple(range(n)))
        site = dispatch.new_site(f"split{n}")

        # the op inside a compiled graph, as a rewritten model calls it; one code object per site, as per layer
        namespace = {"op": torch.ops.asam.adaptive_dispatch, "SCALE": SCALE}
        exec(compile(f"def f(q, k, v):\n    return op(q, k, v, SCALE, True, {site!r}, 64, 0.8, 1.0, 1, 1)\n",
                     f"<site {n}>", "exec"), namespace)
        out = torch.compile(namespace["f"], backend="aot_eager", fullgraph=True)(q, k, v)
        (bucket,) = dispatch._SITES[site].values()
        assert bucket.sparse == tuple(range(n))
        st = SparseSettings(64, 0.8, 1.0, 0, 1, 1)
        ref, _ = selection.reference(q[:, :n], k[:, :n], v[:, :n], scale=SCALE, causal=True, settings=st)
        torch.testing.assert_close(out[:, :n], ref.to(out.dtype), atol=EXACT_TOL, rtol=0)
        dense = torch.nn.functional.scaled_dot_product_attention(q[:, n:], k[:, n:], v[:, n:], is_causal=True,
                                                                 scale=SCALE)
        torch.testing.assert_close(out[:, n:], dense, atol=EXACT_TOL, rtol=0)


def test_sites_with_nothing_to_gain_stay_exact_on_cuda():
    """Note [Nothing to gain]: on CUDA a measured-dispatch site whose best case (only the forced blocks on every
    head) saves no more than the dispatch's own cost stays exact: SmolLM2's shape at 8k and 16k (9 heads, D=64:
    its whole attention then takes ~0.56 ms by the FLOP model), not at 32k, not Gemma-3's global layer at 16k (4
    heads, D=256); the rule is CUDA's, inference's and measured's only."""
    import types

    from asam_compile.kernels import cost
    from asam_compile.passes import adaptive_plan

    site = types.SimpleNamespace(mask_kind="causal", dropout_p=0.0, flex_plan=None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    st = SparseSettings(min_seq_len=0)

    def why(heads, L, E, device=cuda, settings=st, requires_grad=False):
        return adaptive_plan.refusal(site, settings, L, L, E, E, device, requires_grad, heads=heads)

    smol_8k = why(9, 8192, 64)
    assert smol_8k is not None and "measured dispatch's own cost" in smol_8k, smol_8k
    gain, floor = cost.best_dispatch_gain(9, 8192, 8192, 64, True, 0.09)
    assert 0 < gain < floor
    assert why(9, 16384, 64) is not None and why(9, 32768, 64) is None
    assert why(4, 16384, 256) is None
    assert why(9, 8192, 64, device=cpu) is None
    assert why(9, 8192, 64, requires_grad=True) is None
    assert why(9, 8192, 64, settings=st.replaced(dense_fallback="none")) is None
