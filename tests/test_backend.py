"""The backend around the passes: registration, options, dumps, explain, recovery, logging, autocast, shapes."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import math
import subprocess
import sys
import textwrap
import uuid
import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import asam_compile
from asam_compile import AsamConfig, Reject
from helpers import (
    assert_close_to_ref,
    assert_no_worse,
    candidate_summary,
    compile_capture,
    count_sdpa,
    count_softmax,
    double_copy,
    exception_chain,
    input_grads,
    max_abs_err,
    sdpa_nodes,
    to_double,
)
import zoo
from zoo import (
    H,
    HFIndexCausalMask,
    MatmulTranspose,
    NanoGPTCausalSelfAttention,
    RepeatKVCausal,
    SoftmaxDimMinus2,
    TimmAttention,
    ZOO_BY_NAME,
    hidden,
    qkv,
)

from asam_compile.passes import PASS_NAMES


class Block(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class Net(nn.Module):
    """Attention modules nested as blocks.<i>.attn, chained through q (L == S)."""

    def __init__(self, *attns: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([Block(a) for a in attns])

    def forward(self, q, k, v):
        for block in self.blocks:
            q = block(q, k, v)
        return q


class TwoGraphs(nn.Module):
    """Two attentions with a graph break between them: Dynamo hands the backend two graphs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = MatmulTranspose(), MatmulTranspose()

    def forward(self, q, k, v):
        x = self.a(q, k, v)
        torch._dynamo.graph_break()
        return self.b(x, k, v)


# ------------------------------------------------------------------------------------ registration


def test_entry_point_registers_asam_without_import():
    """`backend="asam"` works in a fresh interpreter that never imports asam_compile itself."""
    code = textwrap.dedent(
        """
        import sys, torch
        assert "asam_compile" not in sys.modules
        assert "asam" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        def attn(q, k, v):
            return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v
        q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
        out = torch.compile(attn, backend="asam", options={"inductor": False, "strict": True})(q, k, v)
        torch.testing.assert_close(out, attn(q, k, v))
        assert "asam_compile" in sys.modules  # loaded through the entry point, on first use
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ok" in res.stdout


def test_entry_point_metadata():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert eps.get("asam") == "asam_compile.backend:asam_backend"


def test_public_api():
    for name in ("capture", "explain", "Reject", "Report", "GraphReport", "Candidate", "AsamConfig", "asam_backend"):
        assert name in asam_compile.__all__
        assert hasattr(asam_compile, name)


# ------------------------------------------------------------------------------------ options


BAD_OPTIONS = [
    ("strict", "yes"),
    ("mode", "fast"),
    ("disable_passes", ("bogus",)),
    ("disable_passes", "rewrite"),  # a string, not a list of names
    ("dump_dir", 3),
    ("trust_buffers", 1),
    ("use_gqa", "no"),
    ("disable_inductor_sfdp", None),
    ("inductor", "false"),
]


@pytest.mark.parametrize("key,value", BAD_OPTIONS, ids=[f"{k}={v!r}" for k, v in BAD_OPTIONS])
def test_bad_option_value(key, value):
    with pytest.raises(ValueError) as ei:
        AsamConfig.from_options({key: value})
    assert key in str(ei.value) and repr(value) in str(ei.value)


@pytest.mark.parametrize("key,value", BAD_OPTIONS[:3], ids=[f"{k}={v!r}" for k, v in BAD_OPTIONS[:3]])
def test_bad_option_value_through_torch_compile(key, value):
    """The ValueError surfaces from the compiled call (Dynamo may wrap it in BackendCompilerFailed)."""
    with pytest.raises(Exception) as ei:
        torch.compile(MatmulTranspose(), backend="asam", options={key: value})(*qkv())
    errors = [e for e in exception_chain(ei.value) if isinstance(e, ValueError)]
    assert errors, f"no ValueError in {exception_chain(ei.value)}"
    assert key in str(errors[0]) and repr(value) in str(errors[0])


def test_unknown_option():
    with pytest.raises(ValueError, match="bogus_option"):
        AsamConfig.from_options({"bogus_option": True})
    with pytest.raises(Exception) as ei:
        torch.compile(MatmulTranspose(), backend="asam", options={"bogus_option": True})(*qkv())
    errors = [e for e in exception_chain(ei.value) if isinstance(e, ValueError)]
    assert errors and "bogus_option" in str(errors[0])


def test_explain_validates_options():
    with pytest.raises(ValueError, match="bogus_option"):
        asam_compile.explain(MatmulTranspose(), *qkv(), options={"bogus_option": 1})
    with pytest.raises(ValueError, match="mode"):
        asam_compile.explain(MatmulTranspose(), *qkv(), options={"mode": "fast"})


def test_good_options_accepted():
    cfg = AsamConfig.from_options(
        {"mode": "exact", "strict": True, "dump_dir": None, "disable_passes": ["rewrite"], "trust_buffers": False,
         "use_gqa": False, "disable_inductor_sfdp": True, "inductor": False}
    )
    assert cfg.disable_passes == ("rewrite",) and cfg.strict and not cfg.use_gqa
    assert AsamConfig.from_options(None) == AsamConfig()


# ------------------------------------------------------------------------------------ dumps


def _check_dump(root, expect_rewritten: int = 1):
    graph_dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(graph_dirs) == 1, f"expected one per-graph folder, got {sorted(p.name for p in root.iterdir())}"
    files = sorted(p.name for p in graph_dirs[0].iterdir())
    assert "00_input.py" in files and "report.json" in files, files
    for name in PASS_NAMES:
        assert any(name in f and f.endswith(".py") for f in files), f"no dump for pass {name}: {files}"
    for f in files:
        if f.endswith(".py"):
            ast.parse((graph_dirs[0] / f).read_text())  # dumps are readable Python
    assert "softmax" in (graph_dirs[0] / "00_input.py").read_text()
    rewrite_dump = next(f for f in files if "rewrite" in f and f.endswith(".py"))
    assert "scaled_dot_product_attention" in (graph_dirs[0] / rewrite_dump).read_text()
    report = json.loads((graph_dirs[0] / "report.json").read_text())
    statuses = [c["status"] for c in report["candidates"]]
    assert statuses.count("rewritten") == expect_rewritten, report


def test_dump_dir_option(tmp_path):
    compile_capture(MatmulTranspose(), qkv(), dump_dir=str(tmp_path), inductor=False, strict=True)
    _check_dump(tmp_path)


def test_dump_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ASAM_DUMP_DIR", str(tmp_path))
    compile_capture(MatmulTranspose(), qkv(), inductor=False, strict=True)
    _check_dump(tmp_path)


def test_refusal_in_report_json(tmp_path):
    compile_capture(SoftmaxDimMinus2(), qkv(), dump_dir=str(tmp_path), inductor=False, strict=True)
    (graph_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    report = json.loads((graph_dir / "report.json").read_text())
    (cand,) = report["candidates"]
    assert cand["status"] == "refused" and cand["reject"] == "SOFTMAX_NOT_LAST_DIM"


# ------------------------------------------------------------------------------------ explain, capture, report


def test_explain_names_module_and_reason():
    model = Net(MatmulTranspose(), SoftmaxDimMinus2()).eval()
    inputs = qkv()
    expected = model(*inputs)
    report = asam_compile.explain(model, *inputs)
    assert len(report.candidates) == 2, candidate_summary(report.candidates)
    (good,), (bad,) = report.rewritten, report.refused
    assert "blocks.0.attn" in good.module and good.target == "sdpa"
    assert "blocks.1.attn" in bad.module and bad.reject is Reject.SOFTMAX_NOT_LAST_DIM
    assert bad.source, "the refused candidate should point at the user's source line"
    text = str(report)
    assert "blocks.1.attn" in text and "blocks.0.attn" in text
    # The reason column may wrap; its opening words stay on one line.
    assert Reject.SOFTMAX_NOT_LAST_DIM.value[:35] in text, text
    json.loads(report.to_json())
    # explain runs our passes only: nothing reached Inductor, and the model is untouched.
    assert not any(k.startswith("fxgraph") for k in counters["inductor"]), dict(counters["inductor"])
    torch.testing.assert_close(model(*inputs), expected)


def test_capture_one_report_per_graph():
    model, inputs = TwoGraphs(), qkv()
    out, cap = compile_capture(model, inputs, fullgraph=False, inductor=False, strict=True)
    assert len(cap.reports) == 2 and len(cap.graphs) == 2
    assert cap.n_rewritten == 2 and count_sdpa(cap.graphs) == 2
    torch.testing.assert_close(out, model(*inputs))
    assert len(asam_compile.explain(model, *inputs).graphs) == 2


def test_explain_after_another_compile():
    """explain() sees the graph even when the model was compiled (and cached) with another backend before."""
    model, inputs = MatmulTranspose(), qkv()
    torch.compile(model, backend="eager")(*inputs)
    report = asam_compile.explain(model, *inputs)
    assert len(report.rewritten) == 1, str(report)


def test_nested_captures_both_collect():
    compiled = torch.compile(MatmulTranspose(), backend="asam", options={"inductor": False})
    with asam_compile.capture() as outer:
        with asam_compile.capture() as inner:
            compiled(*qkv())
    assert len(inner.reports) == len(outer.reports) == 1
    assert inner.reports[0] is outer.reports[0]


def test_capture_outside_block_collects_nothing():
    compiled = torch.compile(MatmulTranspose(), backend="asam", options={"inductor": False})
    with asam_compile.capture() as cap:
        pass
    compiled(*qkv())
    assert cap.reports == [] and cap.graphs == []


def test_rewritten_node_keeps_meta():
    """New nodes carry meta["val"], and the user's stack trace and module stack."""
    model = Net(MatmulTranspose()).eval()
    _, cap = compile_capture(model, qkv(), inductor=False, strict=True)
    (node,) = sdpa_nodes(cap.graphs)
    val = node.meta.get("val", node.meta.get("example_value"))
    assert isinstance(val, torch.Tensor) and tuple(val.shape) == (2, H, 17, 16)
    assert "zoo.py" in (node.meta.get("stack_trace") or ""), node.meta.get("stack_trace")
    assert node.meta.get("nn_module_stack"), "nn_module_stack was not copied"
    (cand,) = cap.reports[0].candidates
    assert "blocks.0.attn" in cand.module and cand.source


# ------------------------------------------------------------------------------------ recovery


def _injected(name: str) -> type[Exception]:
    # A fresh class per test: the backend warns once per (pass, exception type).
    return type(f"Injected{name.title()}Failure_{uuid.uuid4().hex[:8]}", (RuntimeError,), {})


@pytest.mark.parametrize("pass_name", PASS_NAMES)
def test_failing_pass_is_undone(monkeypatch, caplog, pass_name):
    module = importlib.import_module(f"asam_compile.passes.{pass_name}")
    original = module.run
    Boom = _injected(pass_name)

    def half_done_then_raise(*args, **kwargs):
        original(*args, **kwargs)  # mutate the graph first: the pipeline must restore it
        raise Boom("injected failure")

    monkeypatch.setattr(module, "run", half_done_then_raise)
    model, inputs = MatmulTranspose(), qkv()
    caplog.set_level(logging.WARNING, logger="asam_compile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, cap = compile_capture(model, inputs, strict=False)
    torch.testing.assert_close(out, model(*inputs))
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning) and Boom.__name__ in str(w.message)]
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING and Boom.__name__ in r.getMessage()]
    assert warned or logged, "a failing pass must be reported as a warning"
    failures = [f for r in cap.reports for f in r.failures]
    assert failures and pass_name in failures[0] and Boom.__name__ in failures[0], failures
    assert str(cap.report).find("pass failures") >= 0
    if pass_name in ("match", "plan", "rewrite"):
        # Nothing rewritten without a match or a plan, or when the rewrite was undone; the softmax stays.
        assert cap.n_rewritten == 0 and count_sdpa(cap.graphs) == 0 and count_softmax(cap.graphs) == 1


@pytest.mark.parametrize("pass_name", PASS_NAMES)
def test_failing_pass_strict_reraises(monkeypatch, pass_name):
    module = importlib.import_module(f"asam_compile.passes.{pass_name}")
    Boom = _injected(pass_name)

    def boom(*args, **kwargs):
        raise Boom("injected failure")

    monkeypatch.setattr(module, "run", boom)
    compiled = torch.compile(MatmulTranspose(), backend="asam", options={"strict": True})
    with pytest.raises(Exception) as ei:
        compiled(*qkv())
    assert any(isinstance(e, Boom) for e in exception_chain(ei.value)), exception_chain(ei.value)


def test_strict_from_env(monkeypatch):
    monkeypatch.setenv("ASAM_STRICT", "1")
    Boom = _injected("rewrite")

    def boom(*args, **kwargs):
        raise Boom("injected failure")

    monkeypatch.setattr(importlib.import_module("asam_compile.passes.rewrite"), "run", boom)
    with pytest.raises(Exception) as ei:
        torch.compile(MatmulTranspose(), backend="asam")(*qkv())
    assert any(isinstance(e, Boom) for e in exception_chain(ei.value))


def test_inductor_failure_falls_back_to_original_graph(monkeypatch):
    from asam_compile import _compat

    real = _compat.compile_fx
    Boom = _injected("inductor")
    calls = []

    def fail_first(gm, example_inputs, *args, **kwargs):
        calls.append(gm)
        if len(calls) == 1:
            raise Boom("injected Inductor failure")
        return real(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(_compat, "compile_fx", fail_first)
    model, inputs = MatmulTranspose(), qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, cap = compile_capture(model, inputs, strict=False)
    torch.testing.assert_close(out, model(*inputs))
    assert len(calls) == 2 and count_sdpa(calls[1]) == 0 and count_softmax(calls[1]) == 1
    assert cap.reports[0].inductor_fallback and Boom.__name__ in cap.reports[0].inductor_fallback


# ------------------------------------------------------------------------------------ logging


def test_info_log_one_summary_line_per_graph(caplog):
    caplog.set_level(logging.INFO, logger="asam_compile")
    _, cap = compile_capture(TwoGraphs(), qkv(), fullgraph=False, inductor=False, strict=True)
    info = [r for r in caplog.records if r.name.startswith("asam_compile") and r.levelno == logging.INFO]
    assert len(cap.reports) == 2
    assert len(info) == 2, [r.getMessage() for r in info]


def test_debug_log_one_line_per_candidate(caplog):
    caplog.set_level(logging.DEBUG, logger="asam_compile")
    _, cap = compile_capture(Net(MatmulTranspose(), SoftmaxDimMinus2()), qkv(), inductor=False, strict=True)
    debug = [r for r in caplog.records if r.name.startswith("asam_compile") and r.levelno == logging.DEBUG]
    assert len(debug) >= len(cap.reports[0].candidates) == 2


def test_no_warning_on_success(caplog, recwarn):
    caplog.set_level(logging.WARNING, logger="asam_compile")
    compile_capture(MatmulTranspose(), qkv(), inductor=False, strict=False)
    assert not [r for r in caplog.records if r.name.startswith("asam_compile")]
    assert not [w for w in recwarn if "asam" in str(w.message)]


# ------------------------------------------------------------------------------------ options that change the rewrite


def test_disable_rewrite_leaves_graph_alone():
    model, inputs = MatmulTranspose(), qkv()
    out, cap = compile_capture(model, inputs, disable_passes=("rewrite",), inductor=False, strict=True)
    assert count_sdpa(cap.graphs) == 0 and count_softmax(cap.graphs) == 1
    torch.testing.assert_close(out, model(*inputs))
    # The report must not claim a rewrite that did not happen.
    assert cap.n_rewritten == 0, candidate_summary(cap.report.candidates)


def test_disable_all_passes():
    model, inputs = MatmulTranspose(), qkv()
    out, cap = compile_capture(model, inputs, disable_passes=PASS_NAMES, inductor=False, strict=True)
    assert count_sdpa(cap.graphs) == 0 and count_softmax(cap.graphs) == 1
    assert cap.reports[0].candidates == []
    torch.testing.assert_close(out, model(*inputs))


def test_use_gqa_false_repeats_kv():
    model, inputs = RepeatKVCausal(), qkv(Hkv=2)
    out, cap = compile_capture(model, inputs, use_gqa=False, inductor=False, strict=True)
    (cand,) = cap.reports[0].candidates
    assert cand.status == "rewritten" and cand.info["enable_gqa"] is False, candidate_summary([cand])
    (node,) = sdpa_nodes(cap.graphs)
    assert not node.kwargs.get("enable_gqa", False)
    ref = model(*to_double(inputs))
    assert_no_worse(max_abs_err(out, ref), max_abs_err(model(*inputs), ref), "use_gqa=False")


def test_gqa_sdpa_node_has_enable_gqa():
    _, cap = compile_capture(RepeatKVCausal(), qkv(Hkv=2), inductor=False, strict=True)
    (node,) = sdpa_nodes(cap.graphs)
    assert node.kwargs.get("enable_gqa") is True and node.kwargs.get("is_causal") is True
    # The key handed to SDPA has the Hkv heads, not the repeated ones.
    k = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
    k_val = k.meta.get("val", k.meta.get("example_value"))
    assert k_val.shape[1] == 2


def test_trust_buffers_false_does_not_claim_causal():
    model, inputs = NanoGPTCausalSelfAttention().eval(), hidden()
    with torch.no_grad():
        out, cap = compile_capture(model, inputs, trust_buffers=False, inductor=False, strict=True)
        ref = double_copy(model)(*to_double(inputs))
        eager = model(*inputs)
    (cand,) = cap.reports[0].candidates
    assert not (cand.status == "rewritten" and cand.info.get("is_causal")), candidate_summary([cand])
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), "trust_buffers=False")


# ------------------------------------------------------------------------------------ autocast


def _autocast_run(model, x):
    ref = double_copy(model)(x.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        out, cap = compile_capture(model, (x,), strict=True)
    return ref, eager, out, cap


def test_autocast_bf16_numerics():
    model, (x,) = TimmAttention().eval(), hidden(L=17)
    ref, eager, out, _ = _autocast_run(model, x)
    assert eager.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), "autocast bf16", slack=1e-3)


def test_autocast_bf16_rewrites():
    model, (x,) = TimmAttention().eval(), hidden(L=17)
    _, _, _, cap = _autocast_run(model, x)
    assert cap.n_rewritten == 1, candidate_summary(cap.report.candidates)


# ------------------------------------------------------------------------------------ dynamic shapes, end to end


DYNAMIC = {
    "matmul_transpose": (MatmulTranspose, lambda n: qkv(L=n), False),
    "hf_index_causal": (HFIndexCausalMask, lambda n: qkv(L=n), True),
    "repeat_kv_causal": (RepeatKVCausal, lambda n: qkv(L=n, Hkv=2), True),
    "nanogpt_causal_buffer": (NanoGPTCausalSelfAttention, lambda n: hidden(L=n), True),
}


def _run_dynamic(name):
    make_model, make_inputs, _ = DYNAMIC[name]
    torch.manual_seed(0)
    model = make_model().eval()
    compiled = torch.compile(model, backend="asam", options={"strict": True}, fullgraph=True, dynamic=True)
    with asam_compile.capture() as cap, torch.no_grad():
        for i, n in enumerate((17, 23, 30)):
            inputs = make_inputs(n)
            out = compiled(*inputs)
            if i == 0:
                n_first = len(cap.reports)
            else:
                assert len(cap.reports) == n_first, f"L={n} recompiled: dynamic=True should serve every length"
            ref = double_copy(model)(*to_double(inputs))
            assert_no_worse(max_abs_err(out, ref), max_abs_err(model(*inputs), ref), f"{name} L={n}")
            assert_close_to_ref(out, ref)
    assert cap.reports, "nothing compiled"
    return cap


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_shapes(name):
    """dynamic=True: one graph serves several lengths, the rewrite fires, and the numbers match."""
    cap = _run_dynamic(name)
    for c in cap.report.candidates:
        assert c.status == "rewritten", candidate_summary(cap.report.candidates)
    assert count_sdpa(cap.graphs) == len(cap.reports)


@pytest.mark.parametrize("name", [n for n, (_, _, causal) in DYNAMIC.items() if causal])
def test_dynamic_shapes_keeps_is_causal(name):
    """A causal mask built from symbolic lengths is still proven causal (is_causal=True, no dense mask)."""
    cap = _run_dynamic(name)
    for c in cap.report.candidates:
        assert c.status == "rewritten" and c.info["is_causal"] is True, candidate_summary(cap.report.candidates)


def test_backward_end_to_end_nanogpt_dynamic():
    model, inputs = NanoGPTCausalSelfAttention().eval(), hidden(L=19)
    ref, w = input_grads(double_copy(model), to_double(inputs), [0])
    eager, _ = input_grads(model, inputs, [0], w)
    compiled = torch.compile(model, backend="asam", options={"strict": True}, fullgraph=True, dynamic=True)
    with asam_compile.capture() as cap:
        grads, _ = input_grads(compiled, inputs, [0], w)
    # With dynamic=True Dynamo turns the dropout's float p into a tensor and, when Inductor cannot take it,
    # restarts with p specialized: the backend may see the graph twice. Every graph it saw is rewritten.
    assert cap.reports and cap.n_rewritten == len(cap.reports), candidate_summary(cap.report.candidates)
    assert_no_worse(max_abs_err(grads[0], ref[0]), max_abs_err(eager[0], ref[0]), "nanoGPT dynamic backward")


# ------------------------------------------------------------------------------------ Inductor's attention pass


def test_inductor_cache_does_not_leak_sfdp_into_asam():
    """A near miss compiled by plain Inductor first (its attention pass on, which miscompiles it, pytorch
    issue 196468) must not be served from Inductor's cache when asam compiles the same graph."""
    from torch._inductor.utils import fresh_cache

    case = ZOO_BY_NAME["near_softmax_dim_minus2"]
    model, inputs = case.make_model().eval(), case.make_inputs()
    expected = model(*inputs)
    with fresh_cache(), torch.no_grad():
        torch.compile(model, backend="inductor", fullgraph=True)(*inputs)
        torch._dynamo.reset()
        out, cap = compile_capture(model, inputs, strict=True)
    assert cap.n_rewritten == 0
    torch.testing.assert_close(out, expected)


def test_disable_inductor_sfdp_patterns_restored():
    """Our backend takes Inductor's attention patterns out while it compiles and puts them back after."""
    case = ZOO_BY_NAME["near_softmax_dim_minus2"]
    model, inputs = case.make_model().eval(), case.make_inputs()
    with torch.no_grad():
        compile_capture(model, inputs, strict=True)
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(model, backend="inductor", fullgraph=True)(*inputs)
    assert counters["inductor"]["fuse_attention"] > 0, "Inductor's patterns were not restored"


# ------------------------------------------------------------------------------------ semantics at the edges


def test_fully_masked_row_matches_eager():
    """A query row with every key masked by -inf: eager softmax gives NaN there, SDPA would give zeros.
    Exact mode must not change what the user's model returns (refusing is fine, so is keeping the NaN)."""
    from zoo import MaskedFillNegInf, keep_mask

    keep = keep_mask(per_query=True)
    keep[0, 0, 3, :] = False  # query 3 of the first sequence sees no key
    model, inputs = MaskedFillNegInf(), (*qkv(), ~keep)
    expected = model(*inputs)
    assert expected.isnan().any()
    with torch.no_grad():
        out, cap = compile_capture(model, inputs, inductor=False, strict=True)
    torch.testing.assert_close(
        out, expected, equal_nan=True, msg=lambda m: f"{m}\n{candidate_summary(cap.report.candidates)}"
    )


def test_finfo_min_fully_masked_row_matches_eager():
    """With finfo.min instead of -inf a fully masked row is uniform in eager: the rewrite keeps it uniform."""
    from zoo import MaskedFillFinfoMin, keep_mask

    keep = keep_mask(per_query=True)
    keep[1, 0, 5, :] = False
    model, inputs = MaskedFillFinfoMin(), (*qkv(), keep)
    with torch.no_grad():
        out, cap = compile_capture(model, inputs, inductor=False, strict=True)
        ref = model(*to_double(inputs))
        eager = model(*inputs)
    assert cap.n_rewritten == 1, candidate_summary(cap.report.candidates)
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), "finfo.min fully masked row")


def test_train_mode_dropout_zero_is_exact():
    from zoo import DropoutModule

    model, inputs = DropoutModule(p=0.0).train(), qkv()
    out, cap = compile_capture(model, inputs, inductor=False, strict=True)
    ref = model(*to_double(inputs))
    assert cap.n_rewritten == 1, candidate_summary(cap.report.candidates)
    assert cap.report.candidates[0].info["dropout_p"] == 0.0
    assert_no_worse(max_abs_err(out, ref), max_abs_err(model(*inputs), ref), "train mode, p=0")


def test_train_mode_dropout_is_passed_on():
    """In train mode with p > 0, a rewrite must hand p to SDPA (or the candidate is refused)."""
    from zoo import FunctionalDropout

    model, inputs = FunctionalDropout(p=0.3).train(), qkv()
    out, cap = compile_capture(model, inputs, inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert out.shape == model(*inputs).shape and torch.isfinite(out).all()
    if cand.status == "rewritten":
        assert cand.info["dropout_p"] == pytest.approx(0.3)
        (node,) = sdpa_nodes(cap.graphs)
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        assert p == pytest.approx(0.3)
    else:
        assert count_softmax(cap.graphs) == 1


def test_train_mode_dropout_keeps_its_probability():
    """Measured, not only passed on: with uniform attention (q = 0) over S keys and v the S x S identity, each
    output entry is one dropped-or-kept probability, 0 or 1 / (S (1 - p)); the share of zeros is the dropout rate
    actually applied, eager and rewritten alike."""
    from zoo import FunctionalDropout

    p, B, H, S = 0.3, 2, 4, 64
    q = torch.zeros(B, H, S, S)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    model = FunctionalDropout(p=p).train()
    torch.manual_seed(0)
    eager = model(q, q, v)
    out, cap = compile_capture(model, (q, q, v), inductor=False, strict=True)
    assert [c.target for c in cap.report.candidates] == ["sdpa"], candidate_summary(cap.report.candidates)
    for name, o in (("eager", eager), ("asam", out)):
        zeros = (o == 0).float().mean().item()
        kept = o[o != 0]
        assert abs(zeros - p) < 0.02, (name, zeros)  # 32768 entries: 4 standard deviations is 0.01
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (S * (1 - p))))


@pytest.mark.parametrize("l,s", [(0, 17), (17, 0)], ids=["L=0", "S=0"])
def test_empty_sequence_refused(l, s):
    model, inputs = MatmulTranspose(), qkv(L=l, S=s)
    out, cap = compile_capture(model, inputs, inductor=False, strict=True)
    (cand,) = cap.report.candidates
    assert cand.status == "refused" and cand.reject is Reject.EMPTY, candidate_summary([cand])
    torch.testing.assert_close(out, model(*inputs))


def test_sfdp_leak_is_caught_and_recompiled(monkeypatch):
    """If Inductor's attention patterns ever escape our removal (they did on an H100 in fp16 before the
    removal covered every pattern pass), the backend sees fuse_attention fire and recompiles without the
    pattern matcher: the near miss still gives the right numbers."""
    import contextlib

    from torch._inductor import config as inductor_config

    from asam_compile import _compat, backend

    monkeypatch.setattr(_compat, "inductor_sfdp_disabled", lambda *a, **k: contextlib.nullcontext(0))
    # The warning is once per process and an earlier compile of the same graph may sit in Inductor's cache.
    monkeypatch.setattr(backend, "_warned", set())
    torch._dynamo.reset()
    case = ZOO_BY_NAME["near_softmax_dim_minus2"]
    model, inputs = case.make_model().eval(), case.make_inputs()
    before = _compat.fuse_attention_count()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, inductor_config.patch(
        fx_graph_cache=False
    ):
        warnings.simplefilter("always")
        out = torch.compile(model, backend="asam", fullgraph=True)(*inputs)
        expected = model(*inputs)
    assert _compat.fuse_attention_count() > before, "the injected leak did not make Inductor's pattern fire"
    assert any("attention pass fired" in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_sfdp_patterns_found_without_their_names():
    """torch 2.11 does not name its pattern entries: they are found through their check functions too."""
    from torch._inductor.fx_passes import joint_graph

    from asam_compile import _compat

    joint_graph.lazy_init()
    named = [e for p in _compat._pattern_passes() for _, e in _compat._sfdp_entries(p)]
    assert len(named) >= 20, len(named)
    assert all(_compat._from_fuse_attention(e.extra_check) for e in named)
    others = [
        e for p in _compat._pattern_passes() for es in p.patterns.values() for e in es if all(e is not n for n in named)
    ]
    assert others and not any(_compat._from_fuse_attention(getattr(e, "extra_check", None)) for e in others)


def test_unrecognised_sfdp_compiles_outside_the_fx_cache(monkeypatch):
    """Where no pattern could be taken out, the compile neither reads nor writes Inductor's FX graph cache,
    so a graph its patterns rewrote can never come back from the cache unseen."""
    import contextlib

    from asam_compile import _compat

    calls = []
    real = _compat.compile_fx

    def spy(*args, **kwargs):
        calls.append((args[3], kwargs.get("use_cache", True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(_compat, "compile_fx", spy)
    case = ZOO_BY_NAME["matmul_transpose"]
    model, inputs = case.make_model().eval(), case.make_inputs()
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend="asam")(*inputs)
        monkeypatch.setattr(_compat, "inductor_sfdp_disabled", lambda *a, **k: contextlib.nullcontext(0))
        torch._dynamo.reset()
        torch.compile(model, backend="asam")(*inputs)
    (key_found, cache_found), (key_none, cache_none) = calls
    assert cache_found and not cache_none, calls
    assert key_found != key_none and key_none.endswith(":sfdp-0"), calls


# ------------------------------------------------------------------------------ recompiles (issue 6)


def _bert_inputs(n: int):
    x = torch.randn((2, n, 64), generator=torch.Generator().manual_seed(n))
    attention_mask = torch.ones((2, n), dtype=torch.long)
    attention_mask[1, n - 5:] = 0
    return x, attention_mask


RECOMPILE_CASES = {
    "matmul_transpose": lambda n: zoo.qkv(L=n),
    "hf_index_causal": lambda n: zoo.qkv(L=n),
    "repeat_kv_causal": lambda n: zoo.qkv(L=n, Hkv=2),
    "nanogpt_causal_buffer": lambda n: zoo.hidden(L=n),
    "hf_llama_gqa": lambda n: zoo.hidden(L=n),
    "hf_bert_padding": _bert_inputs,
}


@pytest.mark.parametrize("name", sorted(RECOMPILE_CASES))
def test_changing_lengths_recompile_as_often_as_plain_inductor(name):
    """Automatic dynamic shapes (torch.compile's default) over four lengths: backend="asam" compiles exactly as
    many graphs as plain torch.compile (no guards of ours), and the rewrite is in every graph it compiles."""
    case = ZOO_BY_NAME[name]
    lengths = (9, 13, 21, 29)  # within the nanoGPT buffer (32)

    def graphs_compiled(backend):
        calls = []

        def counting(gm, example_inputs):
            calls.append(gm)
            return backend(gm, example_inputs)

        torch._dynamo.reset()
        model = case.make_model().eval()
        compiled = torch.compile(model, backend=counting)
        with torch.no_grad(), asam_compile.capture() as cap:
            for n in lengths:
                inputs = RECOMPILE_CASES[name](n)
                torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=2e-5, rtol=1e-4)
        return len(calls), cap

    from torch._inductor.compile_fx import compile_fx

    n_plain, _ = graphs_compiled(compile_fx)
    n_asam, cap = graphs_compiled(lambda gm, ex: asam_compile.asam_backend(gm, ex))
    # a static graph for the first length, then one dynamic graph for the others
    assert n_plain == 2, n_plain
    assert n_asam == n_plain, (n_asam, n_plain)
    assert len(cap.reports) == n_asam and all(len(r.rewritten) == case.n_sites for r in cap.reports), cap.report
