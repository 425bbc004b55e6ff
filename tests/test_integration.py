"""Whole-model integration on CPU: HF generate (Llama, Whisper, T5), DDP and FSDP2 training, each compiled with
backend="asam", give what eager (or plain Inductor) gives, with the attention sites rewritten.

These lock in behaviour that works today. The models are tiny and seeded; every comparison is against the
same model run eagerly or through plain torch.compile. The distributed tests run two gloo ranks on 127.0.0.1
(tests/_integration_dist.py), killed past DIST_TIMEOUT_S. The static-cache tests pin a bug this file found:
every layer after the first was refused (CHANGED_IN_PLACE), because its in-place cache write was taken to lie
inside its attention (the window started at an earlier layer's read of the shared mask).

How generate is compiled: `torch.compile(model)` returns an OptimizedModule whose `generate` attribute is the
original model's bound method, and that calls the original (uncompiled) forward; nothing would be compiled.
The transformers way, used here, is `model.forward = torch.compile(model.forward, ...)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import asam_compile

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)
HERE = Path(__file__).resolve().parent
DIST_WORKER = HERE / "_integration_dist.py"
DIST_TIMEOUT_S = 420  # both ranks together; a hang fails the test instead of blocking CI


# --------------------------------------------------------------------------------------------- helpers


def compile_forward(model: torch.nn.Module, backend: str, options: dict | None = None) -> torch.nn.Module:
    """Replace model.forward (an instance attribute) by its compiled version; generate() then calls it."""
    kwargs = {"options": options} if options is not None else {}
    model.forward = torch.compile(type(model).forward.__get__(model), backend=backend, **kwargs)
    return model


def uncompile_forward(*models: torch.nn.Module) -> None:
    for m in models:
        m.__dict__.pop("forward", None)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sites(cap) -> list[tuple[int, str, str, str | None]]:
    """(graph id, module, status, target) of every candidate asam found; readable in assertion messages."""
    return [(r.graph_id, c.module, c.status, c.target) for r in cap.reports for c in r.candidates]


def assert_every_site_rewritten(cap, targets=("sdpa",)) -> None:
    assert cap.reports, "asam compiled no graph: generate never ran the compiled forward"
    cands = [c for r in cap.reports for c in r.candidates]
    assert cands, "no attention site found"
    assert all(c.status == "rewritten" and c.target in targets for c in cands), sites(cap)
    assert not [f for r in cap.reports for f in r.failures], [r.failures for r in cap.reports]
    assert not [r.inductor_fallback for r in cap.reports if r.inductor_fallback]


def input_ids_length(gm: torch.fx.GraphModule) -> int | None:
    """Sequence length of the graph's input_ids placeholder (1 in a decode step), None if it has none."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and "input_ids" in node.name:
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor):
                return int(val.shape[-1]) if isinstance(val.shape[-1], int) else None
    return None


def new_tokens(out: torch.Tensor, prompt_len: int) -> set[int]:
    return set(out[:, prompt_len:].flatten().tolist())


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def left_padded_batch(model, seed: int = 2):
    """Two prompts of 10 tokens; the second is 4 tokens shorter, padded on the left."""
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = model.config.pad_token_id
    return ids, mask


GREEDY = dict(do_sample=False)


# --------------------------------------------------------------------------------------------- Llama generate


@needs_transformers
def test_compiled_llama_greedy_generate_matches_eager_rewrites_decode_steps_and_compiles_no_more_than_inductor():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(GREEDY, max_new_tokens=6, min_new_tokens=6)
    long_kw = dict(GREEDY, max_new_tokens=12, min_new_tokens=12)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        ref_long = model.generate(ids, **long_kw)
        assert len(new_tokens(ref, 8)) > 1, "degenerate reference: every generated token is the same"

        compile_forward(model, "asam")
        with asam_compile.capture() as cap:
            out = model.generate(ids, **kw)
        asam_graphs = unique_graphs()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)

        # Every site of every graph (prefill and decode) is rewritten into SDPA; 2 layers, 2 sites a graph.
        assert_every_site_rewritten(cap)
        assert [len(r.rewritten) for r in cap.reports] == [2] * len(cap.reports), sites(cap)
        lengths = [input_ids_length(gm) for gm in cap.graphs]
        assert 8 in lengths, lengths  # the prefill
        assert 1 in lengths, lengths  # a decode step, one new token against the KV cache
        assert len(cap.reports) == asam_graphs

        # No compile per decode step: twice as many new tokens reuse the graphs already compiled.
        with asam_compile.capture() as cap_long:
            out_long = model.generate(ids, **long_kw)
        torch.testing.assert_close(out_long, ref_long, rtol=0, atol=0)
        assert unique_graphs() == asam_graphs, (unique_graphs(), asam_graphs)
        assert cap_long.reports == []

        # Plain torch.compile (Inductor) on the same generate call compiles at least as many graphs.
        uncompile_forward(model)
        torch._dynamo.reset()
        counters.clear()
        compile_forward(model, "inductor")
        out_inductor = model.generate(ids, **kw)
        inductor_graphs = unique_graphs()
        torch.testing.assert_close(out_inductor, ref, rtol=0, atol=0)
    assert 0 < asam_graphs <= inductor_graphs, (asam_graphs, inductor_graphs)


@needs_transformers
def test_compiled_llama_greedy_generate_of_a_left_padded_batch_matches_eager():
    model = tiny_llama()
    ids, mask = left_padded_batch(model)
    kw = dict(GREEDY, max_new_tokens=6, min_new_tokens=6, attention_mask=mask)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        assert len(new_tokens(ref, 10)) > 1
        # The padding matters: the padded row generates what it generates alone, not what it would unmasked.
        alone = model.generate(ids[1:, 4:], **dict(GREEDY, max_new_tokens=6, min_new_tokens=6))
        torch.testing.assert_close(ref[1, 10:], alone[0, 6:], rtol=0, atol=0)

        compile_forward(model, "asam", {"inductor": False})
        with asam_compile.capture() as cap:
            out = model.generate(ids, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_every_site_rewritten(cap, targets=("sdpa", "flex"))
    assert [len(r.rewritten) for r in cap.reports] == [2] * len(cap.reports), sites(cap)
    assert 1 in [input_ids_length(gm) for gm in cap.graphs]
    # The padding mask reaches every rewritten site: none of them may drop it (is_causal alone is wrong here).
    for r in cap.reports:
        for c in r.rewritten:
            assert c.info.get("mask") not in (None, "none", "causal"), sites(cap)


def static_cache_generate(model, ids, mask, **kw):
    """generate() through transformers' own compile path: a static KV cache and a CompileConfig naming asam.
    transformers compiles the decode step only (the prefill runs eagerly); _compile_all_devices lets it on CPU."""
    from transformers import CompileConfig

    cc = CompileConfig(backend="asam", options={"inductor": False}, mode=None, fullgraph=False)
    cc._compile_all_devices = True
    return model.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=cc, **kw)


@needs_transformers
def test_llama_generate_with_a_static_cache_compiled_by_transformers_with_asam_matches_eager():
    model = tiny_llama()
    ids, mask = left_padded_batch(model)
    kw = dict(GREEDY, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        with asam_compile.capture() as cap:
            out = static_cache_generate(model, ids, mask, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # One decode graph for all the steps (the static cache keeps every shape), and asam saw it.
    assert unique_graphs() == 1 and len(cap.reports) == 1, sites(cap)
    assert input_ids_length(cap.graphs[0]) == 1
    assert [(c.module, c.status) for c in cap.reports[0].candidates][0] == ("model.layers.0.self_attn", "rewritten")
    assert not cap.reports[0].failures


@needs_transformers
def test_llama_static_cache_decode_rewrites_every_layer():
    model = tiny_llama()
    ids, mask = left_padded_batch(model)
    with torch.no_grad(), asam_compile.capture() as cap:
        static_cache_generate(model, ids, mask, **dict(GREEDY, max_new_tokens=2, min_new_tokens=2))
    assert cap.reports, "transformers compiled nothing"
    assert_every_site_rewritten(cap, targets=("sdpa", "flex"))


def _two_layers_in_place_cache(x, mask, k0, v0, k1, v1, pos):
    """The minimal form of a static-cache decode: each layer writes its new key/value in place, then attends;
    both layers add the same mask."""
    for k, v in ((k0, v0), (k1, v1)):
        k.index_copy_(2, pos, x)
        v.index_copy_(2, pos, x)
        x = ((x @ k.transpose(-2, -1)) * 0.25 + mask).softmax(-1) @ v
    return x


def test_in_place_cache_writes_before_each_layer_sharing_one_mask_do_not_refuse_the_later_layers():
    x = torch.randn(1, 2, 1, 16)
    mask = torch.zeros(1, 1, 1, 8)
    mask[..., 4:] = float("-inf")
    caches = [torch.randn(1, 2, 8, 16) for _ in range(4)]
    pos = torch.tensor([3])
    ref = _two_layers_in_place_cache(x, mask, *(c.clone() for c in caches), pos)
    report = asam_compile.explain(_two_layers_in_place_cache, x, mask, *(c.clone() for c in caches), pos)
    assert [c.status for c in report.candidates] == ["rewritten", "rewritten"], report
    out = torch.compile(_two_layers_in_place_cache, backend="asam", options={"inductor": False})(x, mask, *caches, pos)
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------- seq2seq generate


def compile_seq2seq(model, backend: str, options: dict | None = None):
    """generate() runs the encoder once through get_encoder() and the whole model per decode step: compile both."""
    compile_forward(model, backend, options)
    compile_forward(model.get_encoder(), backend, options)
    return model


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=128,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_decoder_ids=None,
        init_std=0.5,  # the default 0.02 makes random logits so flat that greedy repeats one token
        attn_implementation="eager",
    )
    return WhisperForConditionalGeneration(cfg).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    model = T5ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the default init makes greedy repeat one token; wider weights make it vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=gen)
    return model


def modules_rewritten(cap) -> set[str]:
    return {c.module for r in cap.reports for c in r.rewritten}


@needs_transformers
def test_compiled_whisper_greedy_generate_matches_eager_with_encoder_decoder_and_cross_attention_rewritten():
    model = tiny_whisper()
    feats = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    kw = dict(GREEDY, input_features=feats, max_new_tokens=5, min_new_tokens=5)
    with torch.no_grad():
        ref = model.generate(**kw)
        assert len(set(ref.flatten().tolist())) > 1
        compile_seq2seq(model, "asam", {"inductor": False})
        with asam_compile.capture() as cap:
            out = model.generate(**kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_every_site_rewritten(cap)
    mods = modules_rewritten(cap)
    assert any(m.endswith("layers.0.self_attn") and "decoder" not in m for m in mods), mods  # encoder
    assert "model.decoder.layers.0.self_attn" in mods, mods
    assert "model.decoder.layers.0.encoder_attn" in mods, mods
    assert 1 in [input_ids_length(gm) for gm in cap.graphs]  # a decode step (decoder_input_ids of length 1)


@needs_transformers
def test_compiled_t5_greedy_generate_of_a_padded_batch_matches_eager_with_every_attention_rewritten():
    model = tiny_t5()
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right-padded encoder input
    ids[1, 6:] = model.config.pad_token_id
    kw = dict(GREEDY, input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        ref = model.generate(**kw)
        assert len(set(ref[:, 1:].flatten().tolist())) > 1
        # The padding matters: without the mask the padded row generates other tokens.
        unmasked = model.generate(**{**kw, "attention_mask": None})
        assert not torch.equal(unmasked[1], ref[1])
        compile_seq2seq(model, "asam", {"inductor": False})
        with asam_compile.capture() as cap:
            out = model.generate(**kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_every_site_rewritten(cap)
    mods = modules_rewritten(cap)
    assert {"block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
            "decoder.block.0.layer.1.EncDecAttention"} <= mods, mods
    # Self-attention adds T5's relative position bias (and the padding), cross-attention the padding: every
    # rewritten site keeps a mask.
    assert all(c.info.get("mask", "none") != "none" for r in cap.reports for c in r.rewritten), sites(cap)


# --------------------------------------------------------------------------------------------- DDP / FSDP2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(kind: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run tests/_integration_dist.py as `world` gloo ranks on 127.0.0.1; kill them all past DIST_TIMEOUT_S."""
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on loopback too, not only the rendezvous
    procs, logs = [], []
    for rank in range(world):
        log = open(tmp_path / f"{kind}.{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(DIST_WORKER), kind, str(rank), str(world), port, str(tmp_path / f"{kind}.{rank}.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
        ))
    deadline = time.monotonic() + DIST_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
        for p in hung:
            p.wait(timeout=30)
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank} (rc {procs[rank].returncode}) ---\n" + log.read()[-3000:])
        log.close()
    assert not hung, f"{kind}: ranks hung past {DIST_TIMEOUT_S}s and were killed\n" + "\n".join(tails)
    assert all(p.returncode == 0 for p in procs), "\n".join(tails)
    return [json.loads((tmp_path / f"{kind}.{rank}.json").read_text()) for rank in range(world)]


def check_one_training_step(results: list[dict], n_sites: int | None) -> None:
    """Both ranks: asam rewrote the attention, and its step gives plain Inductor's losses and parameters."""
    for rank, res in enumerate(results):
        asam, ind = res["asam"], res["inductor"]
        where = f"rank {rank}: {asam['sites']}"
        # Every site found is rewritten into causal SDPA, no pass failed, Inductor did not fall back.
        assert asam["n_candidates"] >= 1, where
        assert n_sites is None or asam["n_candidates"] == n_sites, where
        assert all(s[1:] == ["rewritten", "sdpa", True] for s in asam["sites"]), where
        assert not asam["failures"] and not asam["inductor_fallback"], (where, asam)
        assert ind["n_candidates"] == 0  # the baseline is plain Inductor
        # The same loss before and after one SGD step as plain Inductor, and the step lowered the loss.
        assert asam["loss"] == pytest.approx(ind["loss"], rel=1e-5, abs=1e-6), where
        assert asam["loss_after_step"] == pytest.approx(ind["loss_after_step"], rel=1e-5, abs=1e-6), where
        assert asam["loss_after_step"] < asam["loss"], where
        # The same updated parameters (sum, sum of squares and a few values of every full parameter).
        assert asam["params"].keys() == ind["params"].keys()
        for name, stats in asam["params"].items():
            assert stats == pytest.approx(ind["params"][name], rel=1e-5, abs=1e-6), (where, name)
    # Each rank had its own data (different losses), yet all hold the same parameters: gradients were reduced.
    assert results[0]["asam"]["loss"] != results[1]["asam"]["loss"]
    for name, stats in results[0]["asam"]["params"].items():
        assert stats == pytest.approx(results[1]["asam"]["params"][name], rel=1e-6, abs=1e-7), name


@needs_gloo
def test_ddp_training_step_compiled_with_asam_matches_inductor_over_two_cpu_processes(tmp_path):
    # DDP: one graph for the whole model (a single gradient bucket), with both blocks' attention in it.
    check_one_training_step(run_ranks("ddp", tmp_path), n_sites=2)


@needs_gloo
def test_fsdp2_training_step_compiled_with_asam_matches_inductor_over_two_cpu_processes(tmp_path):
    # FSDP2: its hooks break the graph around each block; Dynamo may compile one graph for both blocks.
    check_one_training_step(run_ranks("fsdp2", tmp_path), n_sites=None)
