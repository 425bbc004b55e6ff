"""A zoo of attention spellings as real models write them, each with what asam should do with it.

Every case is a small nn.Module, a function making its inputs, and an expectation: rewritten to SDPA
(optionally with is_causal / enable_gqa) or refused with a `Reject` member. The matcher tests, the numerics
tests and the benchmarks all read this one list. Sizes are tiny (B=2, H=4, E=16, lengths 13..37, several
not powers of two) so that the CPU suite stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

B, H, E = 2, 4, 16
L = 17  # the default sequence length: not a power of two on purpose
S_CROSS = 37  # a key length different from the query length


@dataclasses.dataclass(frozen=True)
class ZooCase:
    name: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    expect: str  # "sdpa", "flex" (rewritten to FlexAttention), "adaptive" (ASAM adaptive sparse) or "refused"
    is_causal: bool | None = None  # checked when not None (rewritten cases)
    enable_gqa: bool | None = None  # checked when not None (rewritten cases)
    reject: str | None = None  # the Reject member name of a refused case
    n_sites: int = 1  # how many attention softmaxes the model has
    train_ok: bool = True  # whether the backward test applies
    grad_argnums: Sequence[int] | None = None  # inputs to differentiate; None: every float input
    mask: str | None = None  # expected info["mask"] ("none" | "causal" | "dense") when not None
    scale: float | None = None  # expected info["scale"] when not None
    options: tuple[tuple[str, Any], ...] = ()  # backend options of the case, as (name, value) pairs

    def __str__(self) -> str:
        return self.name


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(L: int = L, S: int | None = None, Hq: int = H, Hkv: int | None = None, E: int = E, layout: str = "bhle",
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v. layout "bhle": (B, H, L, E); "blhe": (B, L, H, E); "blc": (B, L, H*E); "3d": (B*H, L, E)."""
    S = L if S is None else S
    Hkv = Hq if Hkv is None else Hkv
    g = _gen(seed)

    def make(n, heads):
        if layout == "bhle":
            shape = (B, heads, n, E)
        elif layout == "blhe":
            shape = (B, n, heads, E)
        elif layout == "blc":
            shape = (B, n, heads * E)
        elif layout == "3d":
            shape = (B * heads, n, E)
        else:
            raise ValueError(layout)
        return torch.randn(shape, generator=g)

    return make(L, Hq), make(S, Hkv), make(S, Hkv)


def keep_mask(L: int = L, S: int | None = None, per_query: bool = False, seed: int = 1) -> torch.Tensor:
    """A boolean keep-mask, True = attend; (B, 1, 1, S) padding style or (B, 1, L, S); no row fully masked."""
    S = L if S is None else S
    g = _gen(seed)
    if per_query:
        keep = torch.rand((B, 1, L, S), generator=g) > 0.3
    else:
        keep = torch.ones((B, 1, 1, S), dtype=torch.bool)
        keep[1, ..., S - 5:] = False  # the second sequence is padded
    keep[..., 0] = True  # never a fully masked row: eager softmax gives NaN there, SDPA zeros
    return keep


# ------------------------------------------------------------------------------------ QKᵀ / PV spellings


class MatmulTranspose(nn.Module):
    """torch.matmul with transpose(-2, -1), `* scale` after QKᵀ (most HF models)."""

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        probs = F.softmax(scores, dim=-1)
        return torch.matmul(probs, v)


class AtTranspose23(nn.Module):
    """`@` with transpose(2, 3), `/ math.sqrt(d)`."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(2, 3) / math.sqrt(q.size(-1))
        return scores.softmax(-1) @ v


class Permute0132(nn.Module):
    def forward(self, q, k, v):
        scores = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(E)
        return torch.matmul(torch.softmax(scores, -1), v)


class MT(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.mT * 0.25).softmax(dim=-1) @ v


class Bmm3D(nn.Module):
    """(B·H, L, E) inputs and torch.bmm, as fairseq/older code writes it."""

    def forward(self, q, k, v):
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(q.size(-1)))
        probs = F.softmax(scores, dim=-1)
        return torch.bmm(probs, v)


class Bmm4DFlattened(nn.Module):
    """4-D inputs flattened to (B·H, L, E) inside for bmm, then viewed back."""

    def forward(self, q, k, v):
        b, h, l, e = q.shape
        s = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, l, e), k.reshape(b * h, s, e), v.reshape(b * h, s, e)
        scores = torch.bmm(q3, k3.transpose(-2, -1)) / math.sqrt(e)
        out = torch.bmm(scores.softmax(dim=-1), v3)
        return out.view(b, h, l, e)


class EinsumBHLD(nn.Module):
    def forward(self, q, k, v):
        scores = torch.einsum("bhld,bhsd->bhls", q, k) * q.size(-1) ** -0.5
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhls,bhsd->bhld", probs, v)


class EinsumBLHD(nn.Module):
    """(B, L, H, E) inputs contracted by einsum straight into (B, H, L, S) scores."""

    def forward(self, q, k, v):
        scores = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("bhls,bshd->blhd", probs, v)


class ViewTransposeBLC(nn.Module):
    """Inputs (B, L, H·E) split into heads by view + transpose(1, 2) inside, merged back after."""

    def __init__(self, n_head: int = H):
        super().__init__()
        self.n_head = n_head

    def forward(self, q, k, v):
        b, l, c = q.shape
        s = k.shape[1]
        q = q.view(b, l, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, s, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, s, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return y.transpose(1, 2).contiguous().view(b, l, c)


# ------------------------------------------------------------------------------------ scale spellings


class ScaleQBefore(nn.Module):
    """timm/T5 style: the scale is applied to q before QKᵀ."""

    def forward(self, q, k, v):
        q = q * (q.shape[-1] ** -0.5)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class SqrtScaleSplit(nn.Module):
    """√scale on both q and k (some JAX ports, Stable Diffusion's old attention)."""

    def forward(self, q, k, v):
        s = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
        return torch.matmul(torch.matmul(q * s, (k * s).transpose(-1, -2)).softmax(dim=-1), v)


class SizePowScale(nn.Module):
    """The scale derived from the head size at run time: `q.size(-1) ** -0.5`."""

    def forward(self, q, k, v):
        scaling = q.size(-1) ** -0.5
        attn_weights = torch.matmul(q, k.transpose(2, 3)) * scaling
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        return torch.matmul(attn_weights, v)


class NoScale(nn.Module):
    """T5 folds the scale into its weights: no scale in the attention itself (scale 1)."""

    def forward(self, q, k, v):
        return torch.matmul(torch.matmul(q, k.transpose(3, 2)).softmax(-1), v)


class CustomScaleAttr(nn.Module):
    """A scale that is not 1/√E, stored as a Python float attribute."""

    def __init__(self, scale: float = 0.37):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v


class DivTemperature(nn.Module):
    """`/ self.temperature` (the "Attention is all you need" PyTorch port)."""

    def __init__(self, temperature: float = E ** 0.5 * 1.3):
        super().__init__()
        self.temperature = temperature

    def forward(self, q, k, v):
        attn = torch.matmul(q / self.temperature, k.transpose(2, 3))
        attn = F.softmax(attn, dim=-1)
        return torch.matmul(attn, v)


# ------------------------------------------------------------------------------------ mask spellings


class AdditiveMask(nn.Module):
    """A float mask input added to the scores (HF padding masks, T5/ALiBi-style biases)."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores + mask
        return torch.matmul(F.softmax(scores, dim=-1), v)


def padding_additive_mask(per_query: bool = False) -> torch.Tensor:
    keep = keep_mask(per_query=per_query)
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def bias_additive_mask() -> torch.Tensor:
    """(B, 1, L, S): a random bias with some -inf, never a fully masked row."""
    g = _gen(3)
    bias = torch.randn((B, 1, L, L), generator=g)
    return bias.masked_fill(~keep_mask(per_query=True), float("-inf"))


class MaskedFillNegInf(nn.Module):
    """Boolean drop-mask input, `masked_fill(mask, float('-inf'))`."""

    def forward(self, q, k, v, drop):
        scores = q @ k.transpose(-2, -1) * 0.25
        scores = scores.masked_fill(drop, float("-inf"))
        return scores.softmax(-1) @ v


class MaskedFillFinfoMin(nn.Module):
    """Boolean keep-mask input, `masked_fill(~keep, torch.finfo(dtype).min)`."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return torch.matmul(scores.softmax(dim=-1), v)


class WhereNegInf(nn.Module):
    """`torch.where(keep, scores, -inf)`."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-2, -1)) * q.size(-1) ** -0.5
        scores = torch.where(keep, scores, float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1), v)


class NanoGPTCausalSelfAttention(nn.Module):
    """karpathy/nanoGPT model.py, the slow path (flash=False), with its tril `bias` buffer."""

    def __init__(self, n_embd: int = 64, n_head: int = H, block_size: int = 32, dropout: float = 0.1):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer(
            "bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        )

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def hidden(L: int = 23, C: int = 64, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn((B, L, C), generator=_gen(seed)),)


class TriuFullNegInf(nn.Module):
    """A causal additive mask made in forward: triu(full(-inf), 1) (fairseq, whisper ports)."""

    def forward(self, q, k, v):
        l = q.size(-2)
        mask = torch.triu(torch.full((l, l), float("-inf"), device=q.device), 1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask
        return scores.softmax(-1) @ v


class TrilBoolForward(nn.Module):
    """A causal boolean mask made in forward with tril(ones(bool))."""

    def forward(self, q, k, v):
        l = q.size(-2)
        causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=q.device))
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.matmul(scores.softmax(-1), v)


class HFIndexCausalMask(nn.Module):
    """transformers' masking_utils way: compare query and key indices, then where(m, 0, finfo.min)."""

    def forward(self, q, k, v):
        l, s = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(l, device=q.device)[:, None]
        kv_idx = torch.arange(s, device=q.device)[None, :]
        m = kv_idx <= q_idx
        mask = torch.where(m, torch.tensor(0.0, device=q.device, dtype=q.dtype), torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class HFIndexCausalAndPadding(nn.Module):
    """The index mask combined with a padding mask: a dense mask (not only causal)."""

    def forward(self, q, k, v, keep):
        l, s = q.shape[-2], k.shape[-2]
        q_idx = torch.arange(l, device=q.device)[:, None]
        kv_idx = torch.arange(s, device=q.device)[None, :]
        m = (kv_idx <= q_idx) & keep  # keep: (B, 1, 1, S)
        mask = torch.where(m, torch.tensor(0.0, device=q.device, dtype=q.dtype), torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        return torch.matmul(F.softmax(scores, dim=-1), v)


# ------------------------------------------------------------------------------------ softmax spellings


class SoftmaxFp32ThenTo(nn.Module):
    """Llama/ViT: softmax(dtype=torch.float32).to(q.dtype)."""

    def forward(self, q, k, v):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


class FloatSoftmaxTypeAs(nn.Module):
    """Mistral/T5 style upcast: `.float().softmax(-1).type_as(q)`."""

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        probs = scores.float().softmax(-1).type_as(q)
        return torch.matmul(probs, v)


class SoftmaxModule(nn.Module):
    """nn.Softmax(dim=-1) as a submodule (many older repos)."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.softmax(q @ k.transpose(-2, -1) * 0.25) @ v


class SoftmaxDim3(nn.Module):
    """softmax(dim=3) on 4-D scores: the last dimension written as a positive index."""

    def forward(self, q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=3), v)


# ------------------------------------------------------------------------------------ dropout


class DropoutModule(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.attn_drop = nn.Dropout(p)

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * 0.25
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v


class FunctionalDropout(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        w = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1)), dim=-1)
        w = F.dropout(w, p=self.p, training=self.training)
        return torch.matmul(w, v)


# ------------------------------------------------------------------------------------ GQA / MQA


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv, verbatim."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class RepeatKVCausal(nn.Module):
    """Llama-style GQA: repeat_kv on k and v, causal additive mask."""

    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        l = q.shape[-2]
        mask = torch.triu(torch.full((l, l), float("-inf"), device=q.device), diagonal=1)
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


class RepeatInterleaveGQA(nn.Module):
    """repeat_interleave(k, n_rep, dim=1), no mask."""

    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        k = torch.repeat_interleave(k, n_rep, dim=1)
        v = torch.repeat_interleave(v, n_rep, dim=1)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


class MQAExpand(nn.Module):
    """Multi-query attention: one K/V head expanded over all query heads (repeat_kv with Hkv=1)."""

    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25, dim=-1), v)


# ------------------------------------------------------------------------------------ timm ViT Attention


class TimmAttention(nn.Module):
    """A copy of timm.models.vision_transformer.Attention (timm 1.0) with fused_attn=False."""

    fused_attn = False

    def __init__(self, dim: int = 64, num_heads: int = H, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


def real_timm_attention() -> nn.Module:
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=H, qkv_bias=True)
    attn.fused_attn = False
    return attn


# ------------------------------------------------------------------------------------ transformers models


class HFWrapper(nn.Module):
    """Calls a transformers model with keyword inputs and returns one tensor (logits / last_hidden_state)."""

    def __init__(self, model: nn.Module, output: str, input_name: str = "inputs_embeds", **call_kwargs):
        super().__init__()
        self.model = model
        self.output = output
        self.input_name = input_name
        self.call_kwargs = call_kwargs

    def forward(self, x, attention_mask=None):
        kwargs = dict(self.call_kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.model(**{self.input_name: x}, **kwargs)
        return getattr(out, self.output)


def hf_llama_gqa() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return HFWrapper(transformers.LlamaForCausalLM(cfg), "logits", use_cache=False)


def hf_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return HFWrapper(transformers.GPT2LMHeadModel(cfg), "logits", use_cache=False)


def hf_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return HFWrapper(transformers.BertModel(cfg, add_pooling_layer=False), "last_hidden_state")


def hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return HFWrapper(transformers.ViTModel(cfg, add_pooling_layer=False), "last_hidden_state", "pixel_values")


def bert_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn((B, 19, 64), generator=_gen(0))
    attention_mask = torch.ones((B, 19), dtype=torch.long)
    attention_mask[1, 13:] = 0  # the second sequence is padded
    return x, attention_mask


# ------------------------------------------------------------------------------------ near misses


class SoftmaxDimMinus2(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.25, dim=-2), v)


class SoftmaxDim1(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=1), v)


class SoftmaxImplicitDim(nn.Module):
    """F.softmax without dim (deprecated): on 4-D scores torch picks dim=1, the heads, not the keys."""

    def forward(self, q, k, v):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.25), v)


class LogSoftmax(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(F.log_softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.25, dim=-1), v)


class ProbsReturned(nn.Module):
    """output_attentions=True: the probabilities leave the pattern."""

    def forward(self, q, k, v):
        probs = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.25, dim=-1)
        return torch.matmul(probs, v), probs


class PerHeadScale(nn.Module):
    """A learned per-head temperature of shape (1, H, 1, 1): not one scalar."""

    def __init__(self):
        super().__init__()
        self.head_scale = nn.Parameter(torch.rand((1, H, 1, 1), generator=_gen(5)) * 0.3 + 0.1)

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_scale
        return torch.matmul(scores.softmax(-1), v)


class ProbsTimesTwo(nn.Module):
    def forward(self, q, k, v):
        probs = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return (probs * 2) @ v


class ProbsPow(nn.Module):
    def forward(self, q, k, v):
        probs = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return probs.pow(2) @ v


class ScoresReturned(nn.Module):
    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        return torch.matmul(scores.softmax(-1), v), scores


class TanhSoftcap(nn.Module):
    """Gemma-2 logit soft-capping, c * tanh(scores / c): a Flex score_mod (a near miss where `outer` != cap)."""

    def __init__(self, cap: float = 5.0, outer: float | None = None):
        super().__init__()
        self.cap, self.outer = cap, cap if outer is None else outer

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25
        scores = torch.tanh(scores / self.cap) * self.outer
        return torch.matmul(F.softmax(scores, dim=-1), v)


class SlidingWindowCausal(nn.Module):
    """Mistral-style sliding window: a bool keep-mask from index arithmetic, filled with the dtype's minimum."""

    def __init__(self, window: int = 48):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return torch.matmul(scores.softmax(-1), v)


class MaskedFillZero(nn.Module):
    """masked_fill with 0.0: masked keys keep weight exp(0), which is not masking them out."""

    def forward(self, q, k, v, drop):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        scores = scores.masked_fill(drop, 0.0)
        return torch.matmul(scores.softmax(-1), v)


class NegativeScale(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul((torch.matmul(q, k.transpose(-2, -1)) * -0.25).softmax(-1), v)


# ------------------------------------------------------------------------------------ the zoo


def _m(cls, *args, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls(*args, **kwargs)

    make.__name__ = f"make_{cls.__name__}"
    return make


def _qkv(**kwargs) -> Callable[[], tuple]:
    return lambda: qkv(**kwargs)


def _qkv_and(extra: Callable[[], torch.Tensor], **kwargs) -> Callable[[], tuple]:
    return lambda: (*qkv(**kwargs), extra())


SDPA, REFUSED = "sdpa", "refused"
# every eligible site adaptive, at any length, in blocks of 32, keeping all blocks (exact)
_ADAPTIVE = (("mode", "adaptive"), ("min_seq_len", 0), ("block_size", 32), ("coverage", 1.0), ("max_density", 1.0))

ZOO: list[ZooCase] = [
    # QKᵀ / PV spellings
    ZooCase("matmul_transpose", _m(MatmulTranspose), _qkv(), SDPA, is_causal=False, enable_gqa=False, mask="none",
            scale=0.25),
    ZooCase("at_transpose23_div_sqrt", _m(AtTranspose23), _qkv(L=13), SDPA, is_causal=False, mask="none",
            scale=0.25),
    ZooCase("permute_0132", _m(Permute0132), _qkv(L=16), SDPA, is_causal=False, mask="none", scale=0.25),
    ZooCase("mT", _m(MT), _qkv(L=29), SDPA, is_causal=False, mask="none", scale=0.25),
    ZooCase("bmm_3d", _m(Bmm3D), _qkv(layout="3d"), SDPA, is_causal=False, mask="none", scale=0.25),
    ZooCase("bmm_4d_flattened", _m(Bmm4DFlattened), _qkv(L=21), SDPA, is_causal=False, mask="none", scale=0.25),
    ZooCase("einsum_bhld", _m(EinsumBHLD), _qkv(), SDPA, is_causal=False, mask="none", scale=0.25),
    ZooCase("einsum_blhd", _m(EinsumBLHD), _qkv(layout="blhe", L=19), SDPA, is_causal=False, mask="none",
            scale=0.25),
    ZooCase("view_transpose_blc", _m(ViewTransposeBLC), _qkv(layout="blc", L=23), SDPA, is_causal=False,
            mask="none", scale=0.25),
    ZooCase("cross_attention_L16_S37", _m(MatmulTranspose), _qkv(L=16, S=S_CROSS), SDPA, is_causal=False,
            mask="none", scale=0.25),
    # scale spellings
    ZooCase("scale_q_before", _m(ScaleQBefore), _qkv(), SDPA, scale=0.25),
    ZooCase("sqrt_scale_split", _m(SqrtScaleSplit), _qkv(), SDPA, scale=0.25),
    ZooCase("size_pow_scale", _m(SizePowScale), _qkv(), SDPA, scale=0.25),
    ZooCase("no_scale", _m(NoScale), _qkv(), SDPA, scale=1.0),
    ZooCase("custom_scale_attr", _m(CustomScaleAttr), _qkv(), SDPA, scale=0.37),
    ZooCase("div_temperature", _m(DivTemperature), _qkv(), SDPA, scale=1.0 / (E ** 0.5 * 1.3)),
    # masks
    ZooCase("additive_padding_b11s", _m(AdditiveMask), _qkv_and(padding_additive_mask), SDPA,
            is_causal=False, mask="dense", grad_argnums=(0, 1, 2)),
    ZooCase("additive_padding_b1ls", _m(AdditiveMask), _qkv_and(lambda: padding_additive_mask(per_query=True)),
            SDPA, is_causal=False, mask="dense", grad_argnums=(0, 1, 2)),
    ZooCase("additive_bias_b1ls", _m(AdditiveMask), _qkv_and(bias_additive_mask), SDPA, is_causal=False,
            mask="dense", grad_argnums=(0, 1, 2)),
    ZooCase("masked_fill_neg_inf", _m(MaskedFillNegInf), _qkv_and(lambda: ~keep_mask(per_query=True)), SDPA,
            is_causal=False, mask="dense"),
    ZooCase("masked_fill_finfo_min", _m(MaskedFillFinfoMin), _qkv_and(keep_mask), SDPA, is_causal=False,
            mask="dense"),
    ZooCase("where_neg_inf", _m(WhereNegInf), _qkv_and(keep_mask), SDPA, is_causal=False, mask="dense"),
    ZooCase("nanogpt_causal_buffer", _m(NanoGPTCausalSelfAttention), hidden, SDPA, is_causal=True, mask="causal",
            scale=0.25),
    ZooCase("triu_full_neg_inf", _m(TriuFullNegInf), _qkv(), SDPA, is_causal=True, mask="causal"),
    ZooCase("tril_bool_forward", _m(TrilBoolForward), _qkv(L=31), SDPA, is_causal=True, mask="causal"),
    ZooCase("hf_index_causal", _m(HFIndexCausalMask), _qkv(), SDPA, is_causal=True, mask="causal"),
    ZooCase("hf_index_causal_and_padding", _m(HFIndexCausalAndPadding), _qkv_and(keep_mask), SDPA,
            is_causal=False, mask="dense"),
    # softmax spellings
    ZooCase("softmax_fp32_then_to", _m(SoftmaxFp32ThenTo), _qkv(), SDPA, mask="none"),
    ZooCase("float_softmax_type_as", _m(FloatSoftmaxTypeAs), _qkv(), SDPA, mask="none"),
    ZooCase("nn_softmax_module", _m(SoftmaxModule), _qkv(), SDPA, mask="none"),
    ZooCase("softmax_dim3", _m(SoftmaxDim3), _qkv(), SDPA, mask="none"),
    # dropout (evaluated in eval mode)
    ZooCase("dropout_module", _m(DropoutModule), _qkv(), SDPA, mask="none"),
    ZooCase("functional_dropout", _m(FunctionalDropout), _qkv(), SDPA, mask="none"),
    # GQA / MQA
    ZooCase("repeat_kv_causal", _m(RepeatKVCausal), _qkv(Hkv=2), SDPA, is_causal=True, enable_gqa=True,
            mask="causal"),
    ZooCase("repeat_interleave_gqa", _m(RepeatInterleaveGQA), _qkv(Hkv=2, L=19), SDPA, is_causal=False,
            enable_gqa=True, mask="none"),
    ZooCase("mqa_expand", _m(MQAExpand), _qkv(Hkv=1), SDPA, is_causal=False, enable_gqa=True, mask="none"),
    # timm ViT attention
    ZooCase("timm_attention_copy", _m(TimmAttention), lambda: hidden(L=17), SDPA, is_causal=False, mask="none",
            scale=0.25),
    ZooCase("timm_attention_copy_qk_norm", _m(TimmAttention, qk_norm=True), lambda: hidden(L=17), SDPA,
            is_causal=False, mask="none"),
    ZooCase("timm_attention_real", real_timm_attention, lambda: hidden(L=17), SDPA, is_causal=False, mask="none"),
    # transformers models, eager attention, random weights
    ZooCase("hf_llama_gqa", hf_llama_gqa, lambda: hidden(L=19), SDPA, is_causal=True, enable_gqa=True,
            mask="causal", n_sites=2),
    ZooCase("hf_gpt2", hf_gpt2, lambda: hidden(L=19), SDPA, is_causal=True, mask="causal", n_sites=2),
    ZooCase("hf_bert_padding", hf_bert, bert_inputs, SDPA, is_causal=False, mask="dense", n_sites=2,
            grad_argnums=(0,)),
    ZooCase("hf_vit", hf_vit, lambda: (torch.randn((B, 3, 32, 32), generator=_gen(0)),), SDPA, is_causal=False,
            mask="none", n_sites=2),
    # near misses: left alone, and why
    ZooCase("near_softmax_dim_minus2", _m(SoftmaxDimMinus2), _qkv(), REFUSED, reject="SOFTMAX_NOT_LAST_DIM"),
    ZooCase("near_softmax_dim1", _m(SoftmaxDim1), _qkv(), REFUSED, reject="SOFTMAX_NOT_LAST_DIM"),
    ZooCase("near_softmax_implicit_dim", _m(SoftmaxImplicitDim), _qkv(), REFUSED, reject="SOFTMAX_IMPLICIT_DIM"),
    ZooCase("near_log_softmax", _m(LogSoftmax), _qkv(), REFUSED, reject="LOG_SOFTMAX"),
    ZooCase("near_probs_returned", _m(ProbsReturned), _qkv(), REFUSED, reject="PROBS_ESCAPE"),
    ZooCase("near_per_head_scale", _m(PerHeadScale), _qkv(), REFUSED, reject="SCALE_NOT_SCALAR"),
    ZooCase("near_probs_times_two", _m(ProbsTimesTwo), _qkv(), REFUSED, reject="PROBS_CHANGED"),
    ZooCase("near_probs_pow", _m(ProbsPow), _qkv(), REFUSED, reject="PROBS_CHANGED"),
    ZooCase("near_scores_returned", _m(ScoresReturned), _qkv(), REFUSED, reject="SCORES_ESCAPE"),
    # beyond the brief's list, one per remaining Reject reason that a real model writes
    # Flex on the CPU runs inference only: in training the same site is refused (SOFTCAP_NEEDS_FLEX), exact
    ZooCase("gemma2_tanh_softcap", _m(TanhSoftcap), _qkv(), "flex"),
    ZooCase("near_tanh_not_softcap", _m(TanhSoftcap, 5.0, 4.0), _qkv(), REFUSED, reject="SCORE_OP_UNSUPPORTED"),
    ZooCase("near_masked_fill_zero", _m(MaskedFillZero), _qkv_and(lambda: ~keep_mask(per_query=True)), REFUSED,
            reject="MASK_FILL_VALUE"),
    ZooCase("near_negative_scale", _m(NegativeScale), _qkv(), REFUSED, reject="SCALE_NOT_POSITIVE"),
    # Flex and adaptive targets (inference only on the CPU: Flex has no CPU backward). The adaptive cases keep
    # every block (coverage 1: every block with any estimated mass), so they are exact and judged like the others.
    ZooCase("sliding_window_flex", _m(SlidingWindowCausal, 48), _qkv(L=300), "flex", n_sites=1, train_ok=False,
            options=(("flex", "always"), ("block_size", 32))),
    ZooCase("adaptive_causal", _m(TriuFullNegInf), _qkv(L=256), "adaptive", train_ok=False, options=_ADAPTIVE),
    ZooCase("adaptive_gqa_causal", _m(RepeatKVCausal), _qkv(L=200, Hq=4, Hkv=2), "adaptive", train_ok=False,
            options=_ADAPTIVE),
    ZooCase("adaptive_sliding_window", _m(SlidingWindowCausal, 48), _qkv(L=300), "adaptive", train_ok=False,
            options=_ADAPTIVE),
]

ZOO_BY_NAME = {c.name: c for c in ZOO}
assert len(ZOO_BY_NAME) == len(ZOO), "zoo case names must be unique"


def log_softmax_count(gm) -> int:
    """log_softmax nodes (a near miss: not counted as a softmax by the helpers)."""
    return sum(
        1 for n in gm.graph.nodes
        if (n.op == "call_function" and n.target in (F.log_softmax, torch.log_softmax))
        or (n.op == "call_method" and n.target == "log_softmax")
    )
