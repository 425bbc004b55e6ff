"""Property tests: generated programs that spell attention in equivalent ways are rewritten and exact; near
misses are left alone (and stay exact).

Each example is a `Spec` (a frozen dataclass, printed on failure) that `Program` interprets in `forward` with
Python branches, so Dynamo sees one straight-line graph per spec. Every example compiles with
`options={"strict": True, "inductor": False}`: our passes run (and any failure of theirs raises), the
rewritten graph runs as Python, which keeps an example near 0.1 s on CPU.

How many examples run is the hypothesis profile's business (tests/conftest.py): "ci" by default (fixed
examples, `derandomize=True`), "long" with `ASAM_HYPOTHESIS_PROFILE=long` (random, seed from
`ASAM_HYPOTHESIS_SEED`; `benchmarks/tools/hypothesis_long.py` runs it in parallel shards).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import asam_compile
from asam_compile import Reject
from helpers import (
    assert_no_worse,
    candidate_summary,
    count_sdpa,
    count_softmax,
    flat_tensors,
    input_grads,
    max_abs_err,
    sdpa_arg,
    sdpa_nodes,
    to_double,
)
from zoo import repeat_kv

OPTIONS = {"strict": True, "inductor": False}
BUFFER = 48  # the causal tril buffer is sliced to [:L, :S]; lengths stay below it
NEG_INF = float("-inf")


def budget(share: float) -> settings:
    """This test's share of the loaded profile's max_examples (tests/conftest.py), at least 10."""
    return settings(
        max_examples=max(10, int(settings.default.max_examples * share)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ------------------------------------------------------------------------------------------- the programs


@dataclasses.dataclass(frozen=True)
class Spec:
    """One attention program. Shapes: B batch, H query heads, n_rep query heads per K/V head, lengths L
    and S, head sizes E (queries/keys) and Ev (values). Every other field picks a spelling."""

    rank: int  # 2: (L, E); 3: (B*H, L, E); 4: see layout
    dtype: str  # "float32" | "float64"
    B: int
    H: int
    n_rep: int
    L: int
    S: int
    E: int
    Ev: int
    layout: str  # 4-D: "bhle" inputs, or "blhe" inputs transposed inside (or contracted by einsum)
    views: str  # 3-D inputs viewed between the matmuls (Note [Views of the scores]): "none" |
    #             "bart": 3-D scores viewed (B, H, L, S) for the mask, back to (B*H, L, S) for the softmax |
    #             "bloom": bias.baddbmm(q, kᵀ, beta=1.0, alpha=scale), viewed 4-D for the mask and the softmax,
    #                      the probabilities viewed 3-D for the value matmul |
    #             "deberta": q and k viewed 4-D for the scores, the 4-D probabilities viewed 3-D for the values
    bias_shape: str  # "bloom": its additive bias (an input), "b1s" (B*H, 1, S) | "bls" (B*H, L, S); else "none"
    qk: str  # "matmul" | "at" | "method" | "bmm" | "einsum" | "einsum_ellipsis" | "einsum_kq" | "baddbmm" (bloom)
    kt: str  # how Kᵀ is written: "transpose_neg" | "transpose_pos" | "transpose_rev" | "permute" | "mT" |
    #          "swapaxes" | "t" (2-D) | "pre" (K is passed already transposed, (.., E, S))
    pv: str  # "matmul" | "at" | "method" | "bmm" | "einsum" | "einsum_vfirst": any with any qk (einsum scores
    #          with matmul values and the reverse)
    scale_value: float
    scale_kind: str  # "inv_sqrt_e" (scale_value is E**-0.5) | "const"
    scale_place: str  # "scores_mul" | "scores_rmul" | "scores_div" | "q" | "q_div" | "k" | "split" | "none" |
    #                   "alpha" (bloom: baddbmm's alpha)
    scale_form: str  # for inv_sqrt_e: "math_sqrt" | "pow" | "size_pow" | "const"
    scale_tensor: str  # scores_* places: the factor as a "number" | "full" (torch.full([], f, dtype=s.dtype)) |
    #                    "full_default" (torch.full((), f), float32) | "tensor" (torch.tensor(f)) |
    #                    "runtime" (a 0-dim tensor input: Note [0-dim runtime scales])
    inplace_scale: str  # scores_mul / scores_div on fresh scores: "none" | "op" (s *= f, s /= f) |
    #                     "method" (s.mul_(f), s.div_(f))
    mask: str  # "none" | "additive" | "additive_first" | "drop_neginf" | "keep_finfo" | "where_keep" |
    #            "causal_triu" | "causal_tril_buffer" | "causal_bool_tril" | "causal_arange"
    mask_shape: str  # input masks: "full" | "b1ls" | "b11s" | "ls" | "11ls" | "b1l1"
    mask_values: str  # additive input masks: "bias" (randn, -inf dropped) | "pad_min" (0 or finfo.min)
    fill_tensor: str  # fill values (masked_fill, where): "number" | "full" | "full_default" | "tensor", as above
    inplace_mask: bool  # the mask applied in place on fresh scores: s += m, s.masked_fill_(m, v)
    fully_masked: bool  # some query row has every key masked (-inf masks only: eager gives NaN there)
    softmax: str  # "F" | "method" | "torch" | "module" | "special" | "posdim" | "safe" (aten._safe_softmax)
    roundtrip: str  # "none" | "softmax_dtype_to" | "float_type_as" | "to_float_to" | "double_back"
    gqa: str  # n_rep > 1: "repeat_kv" | "repeat_interleave" | "unsqueeze_expand"
    extras: tuple[str, ...]  # harmless ops, see Program.forward
    grad: bool  # also compare gradients w.r.t. q, k, v (and the runtime scale or bloom's bias)
    seed: int

    @property
    def mask_is_causal(self) -> bool:
        return self.mask.startswith("causal")

    @property
    def mask_is_input(self) -> bool:
        return self.mask not in ("none",) and not self.mask_is_causal

    @property
    def mask_rank(self) -> int:
        """The rank of the scores the mask is applied to (4 where they are viewed 4-D)."""
        return 4 if self.views != "none" else self.rank

    @property
    def scale(self) -> float:
        return 1.0 if self.scale_place == "none" else self.scale_value

    @property
    def scores_scale_divides(self) -> bool:
        """Whether a scores_* scale divides (by 1 / scale_value) rather than multiplies."""
        if self.scale_place == "scores_div":
            return True
        if self.scale_kind == "inv_sqrt_e":
            return self.scale_form == "math_sqrt"
        return self.scale_form == "div"

    @property
    def has_aux(self) -> bool:
        """forward takes a fifth input: the runtime scale, or bloom's bias."""
        return self.scale_tensor == "runtime" or self.views == "bloom"


def _matmul(spelling: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b written as `spelling` says: "matmul" (torch.matmul), "at" (@), "method" (a.matmul), else bmm."""
    if spelling == "matmul":
        return torch.matmul(a, b)
    if spelling == "at":
        return a @ b
    if spelling == "method":
        return a.matmul(b)
    return torch.bmm(a, b)


def _einsum(eq: str, a: torch.Tensor, b: torch.Tensor, swapped: bool) -> torch.Tensor:
    """einsum(eq, a, b), or with swapped=True the same contraction written with b first."""
    if not swapped:
        return torch.einsum(eq, a, b)
    inputs, output = eq.split("->")
    x, y = inputs.split(",")
    return torch.einsum(f"{y},{x}->{output}", b, a)


def _as_tensor(value, how: str, like: torch.Tensor, runtime: torch.Tensor | None = None):
    """A scale or fill value as a Python number, a 0-dim tensor built in the graph (Note [0-dim constants] in
    passes/match.py), or the runtime 0-dim input."""
    if how == "full":
        return torch.full([], value, dtype=like.dtype)
    if how == "full_default":
        return torch.full((), value)
    if how == "tensor":
        return torch.tensor(value)
    if how == "runtime":
        return runtime
    return value


class Program(nn.Module):
    """Hand-written attention spelled as `spec` says. forward(q, k, v, mask, aux) with mask possibly None, aux
    the runtime scale (a 0-dim tensor), bloom's additive bias, or None."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.drop = nn.Dropout(0.3)  # only called under "dropout_module_eval" (the module is in eval mode)
        self.softmax_module = nn.Softmax(dim=-1)
        tril = torch.tril(torch.ones(BUFFER, BUFFER))
        self.register_buffer("bias", tril.view(1, 1, BUFFER, BUFFER) if spec.rank == 4 else tril)

    # -- pieces

    def _scale_factor(self, q: torch.Tensor):
        """('mul', f) or ('div', d) with the scale written as the spec says."""
        sp = self.spec
        if sp.scale_kind == "inv_sqrt_e":
            e = q.shape[-1]
            if sp.scale_form == "math_sqrt":
                return "div", math.sqrt(e)
            if sp.scale_form == "pow":
                return "mul", e ** -0.5
            if sp.scale_form == "size_pow":
                return "mul", q.size(-1) ** -0.5
            return "mul", sp.scale_value
        return ("div", 1.0 / sp.scale_value) if sp.scale_form == "div" else ("mul", sp.scale_value)

    @staticmethod
    def _scaled(x, how, f, rmul=False):
        if how == "div":
            return x / f
        return f * x if rmul else x * f

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        sp = self.spec
        if sp.n_rep == 1:
            return x
        if sp.gqa == "repeat_kv":
            return repeat_kv(x, sp.n_rep)
        if sp.gqa == "repeat_interleave":
            return torch.repeat_interleave(x, sp.n_rep, dim=1)
        b, h, s, e = x.shape
        return x.unsqueeze(2).expand(b, h, sp.n_rep, s, e).reshape(b, h * sp.n_rep, s, e)

    def _kt(self, k: torch.Tensor) -> torch.Tensor:
        kt, r = self.spec.kt, k.dim()
        if kt == "pre":
            return k
        if kt == "transpose_neg":
            return k.transpose(-2, -1)
        if kt == "transpose_rev":
            return k.transpose(-1, -2)
        if kt == "transpose_pos":
            return k.transpose(r - 2, r - 1)
        if kt == "permute":
            return k.permute(*range(r - 2), r - 1, r - 2)
        if kt == "mT":
            return k.mT
        if kt == "swapaxes":
            return torch.swapaxes(k, -1, -2)
        assert kt == "t" and r == 2
        return k.t()

    @staticmethod
    def _einsum_letters(rank: int) -> str:
        return {2: "", 3: "b", 4: "bh"}[rank]

    def _eq(self, x: torch.Tensor, blhe: bool, scores: bool) -> str:
        """The einsum equation of the scores (scores=True) or of the values, for operands of x's rank."""
        if blhe:
            return "blhd,bshd->bhls" if scores else "bhls,bshd->blhd"
        if self.spec.qk == "einsum_ellipsis":
            return "...ld,...sd->...ls" if scores else "...ls,...sd->...ld"
        lead = self._einsum_letters(x.dim())
        return f"{lead}ld,{lead}sd->{lead}ls" if scores else f"{lead}ls,{lead}sd->{lead}ld"

    # -- forward

    def forward(self, q, k, v, mask=None, aux=None):
        sp = self.spec
        ex = sp.extras
        blhe = sp.rank == 4 and sp.layout == "blhe"
        qk_blhe = blhe and sp.qk.startswith("einsum")  # an einsum contracts (B, L, H, E) inputs as they are
        pv_blhe = blhe and sp.pv.startswith("einsum")
        if blhe and not qk_blhe:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if blhe and not pv_blhe:
            v = v.transpose(1, 2)
        if "contiguous_q" in ex:
            q = q.contiguous()
        if "clone_k" in ex:
            k = k.clone()
        if "inplace_k_before" in ex:  # changed in place before any read: the rewrite sees the same k
            k = k.clone()
            k.mul_(1.25)
        if "view_roundtrip_v" in ex:
            shape = v.shape
            v = v.reshape(-1, shape[-1]).view(shape)
        if sp.n_rep > 1:
            k = torch.repeat_interleave(k, sp.n_rep, dim=2) if qk_blhe else self._repeat(k)
            v = torch.repeat_interleave(v, sp.n_rep, dim=2) if pv_blhe else self._repeat(v)

        how, f = self._scale_factor(q)
        if sp.scale_place in ("q", "q_div"):
            q = q / (1.0 / sp.scale_value) if sp.scale_place == "q_div" else self._scaled(q, how, f)
        elif sp.scale_place == "k":
            k = self._scaled(k, how, f)
        elif sp.scale_place == "split":
            root = math.sqrt(sp.scale_value)
            q, k = q * root, k * root

        # scores
        if sp.views == "deberta":  # (B*H, L|S, E) viewed (B, H, L|S, E)
            q, k = q.view(sp.B, sp.H, *q.shape[1:]), k.view(sp.B, sp.H, *k.shape[1:])
        if sp.views == "bloom":
            scores = aux.baddbmm(q, self._kt(k), beta=1.0, alpha=sp.scale_value)
        elif sp.qk.startswith("einsum"):
            # K first ("einsum_kq"): the same contraction, operands swapped
            scores = _einsum(self._eq(q, qk_blhe, scores=True), q, k, swapped=sp.qk == "einsum_kq")
        else:
            scores = _matmul(sp.qk, q, self._kt(k))
        if "clone_scores" in ex:
            scores = scores.clone()
        if sp.scale_place.startswith("scores"):
            how, f = self._scale_factor(q)
            if sp.scale_place == "scores_div" and how == "mul":
                how, f = "div", 1.0 / sp.scale_value
            assert (how == "div") == sp.scores_scale_divides
            f = _as_tensor(f, sp.scale_tensor, scores, runtime=aux)
            if sp.inplace_scale == "op":  # Falcon: `scores /= math.sqrt(d)`
                if how == "div":
                    scores /= f
                else:
                    scores *= f
            elif sp.inplace_scale == "method":  # the name still reads the tensor written
                if how == "div":
                    scores.div_(f)
                else:
                    scores.mul_(f)
            else:
                scores = self._scaled(scores, how, f, rmul=sp.scale_place == "scores_rmul")

        # mask
        if sp.views in ("bart", "bloom"):
            scores = scores.view(sp.B, sp.H, *scores.shape[1:])
        l, s = scores.shape[-2], scores.shape[-1]
        inplace = sp.inplace_mask

        def fill(value):
            return _as_tensor(value, sp.fill_tensor, scores)

        def add(term):
            nonlocal scores
            if inplace:
                scores += term
            else:
                scores = scores + term

        def masked_fill(where, value):
            nonlocal scores
            if inplace:
                scores.masked_fill_(where, fill(value))
            else:
                scores = scores.masked_fill(where, fill(value))

        if sp.mask == "additive":
            add(mask)
        elif sp.mask == "additive_first":
            scores = mask + scores
        elif sp.mask == "drop_neginf":
            masked_fill(mask, NEG_INF)
        elif sp.mask == "keep_finfo":
            masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif sp.mask == "where_keep":
            scores = torch.where(mask, scores, fill(NEG_INF))
        elif sp.mask == "causal_triu":
            add(torch.triu(torch.full((l, s), NEG_INF, device=q.device), 1))
        elif sp.mask == "causal_tril_buffer":
            masked_fill((self.bias[:, :, :l, :s] if sp.rank == 4 else self.bias[:l, :s]) == 0, NEG_INF)
        elif sp.mask == "causal_bool_tril":
            masked_fill(~torch.tril(torch.ones(l, s, dtype=torch.bool, device=q.device)), NEG_INF)
        elif sp.mask == "causal_arange":
            q_idx = torch.arange(l, device=q.device)[:, None]
            kv_idx = torch.arange(s, device=q.device)[None, :]
            zero = torch.tensor(0.0, device=q.device, dtype=scores.dtype)
            add(torch.where(kv_idx <= q_idx, zero, torch.finfo(scores.dtype).min))
        if sp.views == "bart":
            scores = scores.view(sp.B * sp.H, l, s)

        # softmax, with its dtype round trip
        x = scores
        if sp.roundtrip == "float_type_as":
            x = x.float()
        elif sp.roundtrip == "to_float_to":
            x = x.to(torch.float32)
        elif sp.roundtrip == "double_back":
            x = x.double()
        if sp.softmax == "safe":  # rows of -inf give 0, not NaN
            dtype = torch.float32 if sp.roundtrip == "softmax_dtype_to" else None
            probs = torch.ops.aten._safe_softmax(x, -1, dtype=dtype)
        elif sp.roundtrip == "softmax_dtype_to":
            probs = F.softmax(x, dim=-1, dtype=torch.float32)
        elif sp.softmax == "F":
            probs = F.softmax(x, dim=-1)
        elif sp.softmax == "method":
            probs = x.softmax(-1)
        elif sp.softmax == "torch":
            probs = torch.softmax(x, -1)
        elif sp.softmax == "module":
            probs = self.softmax_module(x)
        elif sp.softmax == "special":
            probs = torch.special.softmax(x, dim=-1)
        else:
            probs = torch.softmax(x, dim=x.dim() - 1)
        if sp.roundtrip in ("softmax_dtype_to", "to_float_to", "double_back"):
            probs = probs.to(q.dtype)
        elif sp.roundtrip == "float_type_as":
            probs = probs.type_as(q)
        if "dropout_p0" in ex:
            probs = F.dropout(probs, p=0.0, training=True)
        if "torch_dropout_p0" in ex:  # training with p = 0: the identity
            probs = torch.dropout(probs, 0.0, True)
        if "F_dropout_p0_default" in ex:  # training=True is F.dropout's default
            probs = F.dropout(probs, 0.0)
        if "dropout_module_eval" in ex:
            probs = self.drop(probs)
        if "contiguous_probs" in ex:
            probs = probs.contiguous()
        if sp.views in ("bloom", "deberta"):
            probs = probs.view(-1, *probs.shape[-2:])

        # values
        if sp.pv.startswith("einsum"):
            out = _einsum(self._eq(probs, pv_blhe, scores=False), probs, v, swapped=sp.pv == "einsum_vfirst")
        else:
            out = _matmul(sp.pv, probs, v)
        if blhe and not pv_blhe:
            out = out.transpose(1, 2)
            if "contiguous_out" in ex:
                out = out.contiguous()
        return out


# ------------------------------------------------------------------------------------------- strategies


EXTRAS = ("contiguous_q", "clone_k", "inplace_k_before", "view_roundtrip_v", "clone_scores", "dropout_p0",
          "torch_dropout_p0", "F_dropout_p0_default", "dropout_module_eval", "contiguous_probs", "contiguous_out")
INPUT_MASKS = ("additive", "additive_first", "drop_neginf", "keep_finfo", "where_keep")
CAUSAL_MASKS = ("causal_triu", "causal_tril_buffer", "causal_bool_tril", "causal_arange")
NEG_INF_MASKS = ("additive", "additive_first", "drop_neginf", "where_keep")  # may leave a row without keys
FILL_MASKS = ("drop_neginf", "keep_finfo", "where_keep", "causal_tril_buffer", "causal_bool_tril")
INPLACE_MASKS = ("additive", "drop_neginf", "keep_finfo", "causal_triu", "causal_tril_buffer", "causal_bool_tril",
                 "causal_arange")
MATMULS = ("matmul", "at", "method")
EINSUMS = ("einsum", "einsum_ellipsis", "einsum_kq")
KTS = ("transpose_neg", "transpose_pos", "transpose_rev", "permute", "mT", "swapaxes", "pre")




@st.composite
def specs(draw) -> Spec:
    rank = draw(st.sampled_from([4, 4, 4, 3, 3, 2]))
    dtype = draw(st.sampled_from(["float32", "float32", "float64"]))
    views = draw(st.sampled_from(["none", "none", "bart", "bloom", "deberta"])) if rank == 3 else "none"
    B = draw(st.integers(1, 3)) if rank >= 3 else 1
    n_rep = draw(st.sampled_from([1, 1, 2, 3])) if rank == 4 else 1
    H = n_rep * draw(st.integers(1, 3)) if rank == 4 else draw(st.integers(1, 3)) if rank == 3 else 1
    L, S = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    E = draw(st.sampled_from([1, 3, 8, 13, 16, 24]))
    Ev = draw(st.sampled_from([E, E, E, 5, 16]))
    layout = draw(st.sampled_from(["bhle", "blhe"])) if rank == 4 else "bhle"
    bias_shape = draw(st.sampled_from(["b1s", "bls"])) if views == "bloom" else "none"

    # scores and values: matmul-like or einsum, in any mix; views between the matmuls with matmuls only (an
    # einsum there is refused, EINSUM_UNSUPPORTED)
    einsums = EINSUMS if views == "none" else ()
    if views == "bloom":
        qk = "baddbmm"
    else:
        qk = draw(st.sampled_from(MATMULS + einsums + (("bmm",) if rank == 3 and views != "deberta" else ())))
    pvs = MATMULS + (("bmm",) if rank == 3 else ())
    pv = draw(st.sampled_from(
        (["einsum", "einsum_vfirst"] * (2 if qk.startswith("einsum") else 1) if einsums else []) + list(pvs)))
    kt = "transpose_neg" if qk.startswith("einsum") else draw(st.sampled_from(KTS + (("t",) if rank == 2 else ())))
    if layout == "blhe" and kt == "pre":
        kt = "transpose_neg"

    scale_kind = draw(st.sampled_from(["inv_sqrt_e", "const"]))
    if scale_kind == "inv_sqrt_e":
        scale_value = E ** -0.5
        scale_form = draw(st.sampled_from(["math_sqrt", "pow", "size_pow", "const"]))
    else:
        scale_value = draw(st.floats(0.01, 2.0))
        scale_form = draw(st.sampled_from(["mul", "div"]))
    if views == "bloom":
        scale_place = "alpha"
    else:
        scale_place = draw(st.sampled_from(
            ["scores_mul", "scores_rmul", "scores_div", "q", "q_div", "k", "split", "none"]))
    on_scores = scale_place.startswith("scores")
    scale_tensor = draw(st.sampled_from(["number", "number", "full", "full_default", "tensor", "runtime"])) \
        if on_scores else "number"
    inplace_scale = draw(st.sampled_from(["none", "none", "op", "method"])) \
        if scale_place in ("scores_mul", "scores_div") else "none"

    mask = draw(st.sampled_from(("none",) + INPUT_MASKS + CAUSAL_MASKS))
    if mask in ("additive", "additive_first"):
        shapes = {4: ["full", "b1ls", "b11s", "ls", "11ls", "b1l1"], 3: ["full", "ls", "b1l1"], 2: ["full"]}
    elif mask in INPUT_MASKS:
        shapes = {4: ["full", "b1ls", "b11s", "ls"], 3: ["full", "ls"], 2: ["full"]}
    else:
        shapes = {4: ["full"], 3: ["full"], 2: ["full"]}
    mask_shape = draw(st.sampled_from(shapes[4 if views != "none" else rank]))
    mask_values = draw(st.sampled_from(["bias", "pad_min"])) if mask in ("additive", "additive_first") else "bias"
    fill_tensor = draw(st.sampled_from(["number", "number", "full", "full_default", "tensor"])) \
        if mask in FILL_MASKS else "number"
    if fill_tensor == "full_default" and mask == "keep_finfo":
        fill_tensor = "full"  # torch.full((), float64's finfo.min) overflows float32 (the reference runs in float64)
    # in place on fresh scores only: not on bart's or bloom's 4-D view of them
    inplace_mask = mask in INPLACE_MASKS and views not in ("bart", "bloom") and draw(st.integers(0, 2)) == 0
    fully_masked = mask in NEG_INF_MASKS and mask_values == "bias" and draw(st.integers(0, 4)) == 0

    softmax = draw(st.sampled_from(["F", "method", "torch", "module", "special", "posdim", "safe"]))
    roundtrip = draw(st.sampled_from(["none", "none", "softmax_dtype_to", "float_type_as", "to_float_to",
                                      "double_back"]))
    gqa = draw(st.sampled_from(["repeat_kv", "repeat_interleave", "unsqueeze_expand"])) if n_rep > 1 else "none"
    extras = tuple(x for x in EXTRAS if draw(st.integers(0, 5)) == 0)
    grad = draw(st.integers(0, 3)) == 0 and not fully_masked
    seed = draw(st.integers(0, 2**16))
    return Spec(
        rank=rank, dtype=dtype, B=B, H=H, n_rep=n_rep, L=L, S=S, E=E, Ev=Ev, layout=layout, views=views,
        bias_shape=bias_shape, qk=qk, kt=kt, pv=pv, scale_value=scale_value, scale_kind=scale_kind,
        scale_place=scale_place, scale_form=scale_form, scale_tensor=scale_tensor, inplace_scale=inplace_scale,
        mask=mask, mask_shape=mask_shape, mask_values=mask_values, fill_tensor=fill_tensor,
        inplace_mask=inplace_mask, fully_masked=fully_masked, softmax=softmax, roundtrip=roundtrip, gqa=gqa,
        extras=extras, grad=grad, seed=seed,
    )


def make_inputs(sp: Spec) -> tuple:
    """q, k, v in the spec's layout, its mask (None, bool or float), and aux: the runtime scale (a 0-dim
    tensor), bloom's additive bias, or None."""
    g = torch.Generator().manual_seed(sp.seed)
    dtype = getattr(torch, sp.dtype)
    hkv = sp.H // sp.n_rep

    def make(n, heads, e):
        if sp.rank == 2:
            shape = (n, e)
        elif sp.rank == 3:
            shape = (sp.B * sp.H, n, e)
        elif sp.layout == "bhle":
            shape = (sp.B, heads, n, e)
        else:
            shape = (sp.B, n, heads, e)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = make(sp.L, sp.H, sp.E), make(sp.S, hkv, sp.E), make(sp.S, hkv, sp.Ev)
    if sp.kt == "pre":
        k = k.transpose(-2, -1).contiguous()
    mask = None
    if sp.mask_is_input:
        lead = {4: (sp.B, sp.H), 3: (sp.B * sp.H,), 2: ()}[sp.mask_rank]
        shape = {
            "full": (*lead, sp.L, sp.S),
            "b1ls": (sp.B, 1, sp.L, sp.S),
            "b11s": (sp.B, 1, 1, sp.S),
            "ls": (sp.L, sp.S),
            "11ls": (1, 1, sp.L, sp.S),
            "b1l1": (*lead[:1], *(1,) * (len(lead) - 1), sp.L, 1),
        }[sp.mask_shape]
        keep = torch.rand(shape, generator=g) > 0.35
        if sp.mask_shape != "b1l1":
            keep[..., 0] = True  # a row without keys only where the spec asks for one
        if sp.fully_masked and shape[-2] > 1:
            keep[..., shape[-2] // 2, :] = False
        if sp.mask_shape == "b1l1" and not sp.fully_masked:
            keep[...] = True
        if sp.mask in ("additive", "additive_first"):
            if sp.mask_values == "pad_min":
                mask = torch.zeros(shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
            else:
                mask = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).masked_fill(~keep, NEG_INF)
        elif sp.mask == "drop_neginf":
            mask = ~keep
        else:
            mask = keep
    aux = None
    if sp.views == "bloom":
        shape = (sp.B * sp.H, 1 if sp.bias_shape == "b1s" else sp.L, sp.S)
        aux = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    elif sp.scale_tensor == "runtime":
        aux = torch.tensor(1.0 / sp.scale_value if sp.scores_scale_divides else sp.scale_value, dtype=dtype)
    return q, k, v, mask, aux


# ------------------------------------------------------------------------------------------- checks


def compile_and_run(model: nn.Module, inputs: tuple, grad: bool = False):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options=OPTIONS, fullgraph=True)
    with asam_compile.capture() as cap, torch.set_grad_enabled(grad):
        out = compiled(*inputs)
    return compiled, out, cap


def reference(sp: Spec, inputs: tuple):
    """The same program in float64 without its dtype round trip (a round trip is the identity in exact maths)."""
    ref_spec = dataclasses.replace(sp, roundtrip="none")
    with torch.no_grad():
        return Program(ref_spec).double().eval()(*to_double(inputs))


def forward_slack(sp: Spec, inputs: tuple) -> float:
    """The rounding a float32 attention may add on top of eager's: a score rounded by eps * |s| moves the output
    by about that times |v|, and both programs round their scores differently (eager may be lucky by more
    than assert_no_worse's factor). |s| is bounded by scale * |q_i| * |k_j| (Cauchy-Schwarz) + the mask."""
    q, k, v, mask, aux = inputs
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return 1e-6
    k_norm = k.double().norm(dim=-2 if sp.kt == "pre" else -1).max().item()
    k_norm *= 1.25 if "inplace_k_before" in sp.extras else 1.0
    s_max = sp.scale * q.double().norm(dim=-1).max().item() * k_norm
    if mask is not None and mask.is_floating_point() and torch.isfinite(mask).any():
        s_max += mask[torch.isfinite(mask)].abs().max().item() if sp.mask_values == "bias" else 0.0
    if sp.views == "bloom":
        s_max += aux.abs().max().item()
    eps = torch.finfo(q.dtype).eps
    return max(1e-6, 4 * eps * s_max * v.abs().max().item())


def expected_scale(sp: Spec) -> float:
    """SDPA's scale. A factor on k under `k.t()` stays in the key operand (normalize does not rewrite `.t()`
    into a transpose, so the matcher does not look through it): the same product, another split."""
    if sp.kt == "t" and sp.scale_place == "k":
        return 1.0
    if sp.kt == "t" and sp.scale_place == "split":
        return math.sqrt(sp.scale_value)
    return sp.scale


def expected_scales(sp: Spec) -> tuple[float, ...]:
    """The scales SDPA may be given: the same product, split another way between the scale and the operands.
    `k.mul_(1.25)` on a fresh clone of k ("inplace_k_before") is made out of place (Note [In-place arithmetic on
    a fresh tensor]): a factor on k that the matcher may fold into the scale. DeBERTa's factors on q and k sit
    before their 4-D views, and may stay in the operands."""
    options = {expected_scale(sp)}
    if "inplace_k_before" in sp.extras:
        options |= {x * 1.25 for x in options}
    if sp.views == "deberta" and sp.scale_place in ("q", "q_div", "k", "split"):
        root = math.sqrt(sp.scale_value)
        fq, fk = {"q": (sp.scale_value, 1.0), "q_div": (sp.scale_value, 1.0), "k": (1.0, sp.scale_value),
                  "split": (root, root)}[sp.scale_place]
        options |= {x / f for x in options for f in (fq, fk, fq * fk)}
    return tuple(options)


def expected_mask(sp: Spec) -> str:
    if sp.mask_is_input or sp.views == "bloom":  # bloom's bias is an input
        return "dense"
    if sp.mask_is_causal:
        return "causal" if sp.S > 1 else "none"  # with one key the causal mask masks nothing
    return "none"


@given(specs())
@budget(0.5)
def test_equivalent_spelling_is_rewritten_and_exact(sp: Spec):
    """Every equivalent spelling of attention becomes one SDPA call whose numbers are as good as eager's."""
    model = Program(sp).eval()
    inputs = make_inputs(sp)
    _, out, cap = compile_and_run(model, inputs)
    cands = cap.report.candidates
    msg = f"{sp}\n{candidate_summary(cands)}"
    note(msg)
    assert len(cands) == 1 and cands[0].status == "rewritten" and cands[0].target == "sdpa", msg
    assert count_sdpa(cap.graphs) == 1 and count_softmax(cap.graphs) == 0, msg
    info = cands[0].info
    # a runtime mask tensor is planned for Flex too (Note [Runtime masks as in-graph block masks]): "dense:<name>"
    mask_kind = info["mask"].split(":")[0]
    assert mask_kind == expected_mask(sp), msg
    assert info["is_causal"] is (expected_mask(sp) == "causal"), msg
    assert info["dropout_p"] == 0.0, msg
    if sp.scale_tensor == "runtime":  # Note [0-dim runtime scales]: folded into q, not a number
        assert info["scale"] == "symbolic", msg
    if info["scale"] != "symbolic":
        assert any(info["scale"] == pytest.approx(x, rel=1e-5, abs=1e-6) for x in expected_scales(sp)), msg
    (node,) = sdpa_nodes(cap.graphs)
    assert (sdpa_arg(node, "attn_mask") is not None) == (mask_kind == "dense"), msg
    gqa_expected = (
        sp.n_rep > 1 and sp.rank == 4 and not sp.qk.startswith("einsum") and not sp.pv.startswith("einsum")
        and sp.kt != "pre" and expected_mask(sp) != "dense"
    )
    if gqa_expected:
        assert info["enable_gqa"] is True, msg
    if sp.n_rep == 1:
        assert info["enable_gqa"] is False, msg

    ref = reference(sp, inputs)
    with torch.no_grad():
        eager = model(*inputs)
    assert_no_worse(max_abs_err(out, ref), max_abs_err(eager, ref), msg, slack=forward_slack(sp, inputs))
    if sp.grad:
        check_grads(model, sp, inputs, msg)


def check_grads(model: nn.Module, sp: Spec, inputs: tuple, msg: str) -> None:
    """Gradients w.r.t. q, k, v (and the runtime scale or bloom's bias) through the rewritten graph are as close
    to float64's as eager's are."""
    argnums = [0, 1, 2, 4] if sp.has_aux else [0, 1, 2]
    ref_model = Program(dataclasses.replace(sp, roundtrip="none")).double().eval()
    ref, weights = input_grads(ref_model, to_double(inputs), argnums)
    eager, _ = input_grads(model, inputs, argnums, weights)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options=OPTIONS, fullgraph=True)
    with asam_compile.capture() as cap:
        grads, _ = input_grads(compiled, inputs, argnums, weights)
    assert cap.n_rewritten == 1, f"{msg}\n(backward compile) {candidate_summary(cap.report.candidates)}"
    # Rounding noise scales with the sizes inside the backward, not with the result: with one key (S = 1) the
    # gradients of q and k are 0 in exact maths and in eager float32, while SDPA's backward (flash on CPU, which
    # takes rowsum(dO * O) for rowsum(P * dP)) leaves noise of order eps * |dP| * |k| * scale there.
    # |dP| = |dO @ vᵀ| <= max|dO| * max|v| * Ev.
    q_max, k_max, v_max = (x.abs().max().item() if x.numel() else 0.0 for x in inputs[:3])
    backward_size = max(w.abs().max().item() for w in weights) * v_max * sp.Ev * max(q_max, k_max) * sp.scale
    slack = 1e-6 * max(1.0, backward_size, *(g.abs().max().item() for g in ref))
    for name, g, g_eager, g_ref in zip(("q", "k", "v", "aux"), grads, eager, ref):
        assert_no_worse(max_abs_err(g, g_ref), max_abs_err(g_eager, g_ref), f"grad of {name}: {msg}", slack=slack)


# ------------------------------------------------------------------------------------------- near misses


# What each near miss changes, and the reason the matcher must give. Each one is a program that is not
# softmax(QKᵀ·scale + mask)·V, or one whose rewrite asam documents as refused.
NEAR_MISSES = {
    "softmax_dim_m2": Reject.SOFTMAX_NOT_LAST_DIM,
    "softmax_dim1": Reject.SOFTMAX_NOT_LAST_DIM,
    "softmax_implicit_dim": Reject.SOFTMAX_IMPLICIT_DIM,
    "log_softmax": Reject.LOG_SOFTMAX,
    "probs_returned": Reject.PROBS_ESCAPE,
    "probs_reused": Reject.PROBS_ESCAPE,  # probs feed the value matmul and a sum that is returned
    "scores_returned": Reject.SCORES_ESCAPE,
    "probs_times_two": Reject.PROBS_CHANGED,
    "probs_plus": Reject.PROBS_CHANGED,
    "probs_pow": Reject.PROBS_CHANGED,
    "probs_sqrt": Reject.PROBS_CHANGED,
    "probs_transposed": Reject.PROBS_CHANGED,  # needs L == S
    "per_head_scale": Reject.SCALE_NOT_SCALAR,
    # a tensor computed from the data, one factor per query row (a 0-dim one is a runtime scale, rewritten:
    # Note [0-dim runtime scales])
    "row_tensor_scale": Reject.SCALE_NOT_SCALAR,
    "negative_scale": Reject.SCALE_NOT_POSITIVE,
    "masked_fill_zero": Reject.MASK_FILL_VALUE,
    "masked_fill_small": Reject.MASK_FILL_VALUE,  # -5 is not a large negative: masked keys keep weight
    "mask_broadcasts_batch": Reject.MASK_NOT_BROADCASTABLE,  # q/k/v batch 1, mask batch B
    # scores + a 5-D mask are 5-D scores: refused for their rank before the mask is looked at
    "mask_5d": (Reject.MASK_NOT_BROADCASTABLE, Reject.UNSUPPORTED_RANK),
    "kv_broadcast_batch": Reject.SHAPE_MISMATCH,  # k/v batch 1 broadcast by the matmul against q batch B
    # c * tanh(x / c) is soft-capping, rewritten for Flex (Note [Soft-capped scores]); with two constants it is not
    "tanh_not_softcap": Reject.SCORE_OP_UNSUPPORTED,
    "mask_minus_scores": Reject.SCORE_OP_UNSUPPORTED,
    # q, k or the mask changed in place after the scores are made: the original used the old values, one SDPA
    # call at the value matmul would read the new ones (a miscompile found here; Note [Tensors changed in
    # place inside the pattern] in passes/match.py). q and the mask are written through a view, k is read
    # through its transpose (never with einsum): an in-place op on a fresh tensor that no view reads is made
    # out of place (Note [In-place arithmetic on a fresh tensor]), and that is rewritten, correctly.
    "k_changed_in_place": Reject.CHANGED_IN_PLACE,
    "q_changed_in_place": Reject.CHANGED_IN_PLACE,
    "k_row_assigned": Reject.CHANGED_IN_PLACE,
    "mask_changed_in_place": Reject.CHANGED_IN_PLACE,
    "k_view_written": Reject.CHANGED_IN_PLACE,  # `k.view(-1)[:5] = 0` between the scores and `probs @ (v + k)`
    # `scores /= c` in place while a view of the scores, taken before, is read later: it sees the division
    "inplace_scale_view_read": Reject.CHANGED_IN_PLACE,
    # (B*H, L, S) scores viewed (B*H, L//2, 2*S) for the softmax: rows of two queries, not attention
    "view_regroups_query": None,
    # (scores + mask) / t with t a runtime 0-dim tensor: it would scale the mask too (Note [0-dim runtime scales])
    "runtime_scale_after_mask": Reject.SCALE_NOT_SCALAR,
}
MUTATING = ("k_changed_in_place", "q_changed_in_place", "k_row_assigned", "mask_changed_in_place", "k_view_written")


class NearMiss(nn.Module):
    """One base attention (4-D, (B, H, L|S, E)) with the change `kind` applied."""

    def __init__(self, kind: str, scale: float, qk: str, H: int):
        super().__init__()
        self.kind, self.scale, self.qk = kind, scale, qk
        g = torch.Generator().manual_seed(5)
        self.head_scale = nn.Parameter(torch.rand((1, H, 1, 1), generator=g) * 0.3 + 0.1)

    def forward(self, q, k, v, mask, t=None):
        kind = self.kind
        if kind in MUTATING:  # change copies, not the caller's tensors
            q, k = q.clone(), k.clone()
            mask = mask.clone() if mask is not None else None
        if kind == "view_regroups_query":  # 3-D, BART-like
            b, h, l, e = q.shape
            q, k, v = (x.reshape(b * h, x.shape[2], x.shape[3]) for x in (q, k, v))
            s = torch.einsum("bld,bsd->bls", q, k) if self.qk == "einsum" else _matmul(self.qk, q, k.transpose(1, 2))
            probs = torch.softmax((s * self.scale).view(b * h, l // 2, -1), -1)
            return torch.bmm(probs.view(b * h, l, -1), v)
        if self.qk == "einsum":
            scores = torch.einsum("bhld,bhsd->bhls", q, k)
        elif self.qk == "at":
            scores = q @ k.transpose(-2, -1)
        else:
            scores = torch.matmul(q, k.transpose(2, 3))
        extra = ()
        if kind == "per_head_scale":
            scores = scores * self.head_scale.to(scores.dtype)
        elif kind == "row_tensor_scale":
            scores = scores * (q.abs().mean(-1, keepdim=True) * self.scale)
        elif kind == "negative_scale":
            scores = scores * -self.scale
        elif kind == "inplace_scale_view_read":
            first = scores[..., :1]  # a view: it sees the in-place division
            scores /= 1.0 / self.scale
        elif kind == "runtime_scale_after_mask":
            pass  # scaled by t after the mask, below
        else:
            scores = scores * self.scale
        if kind == "masked_fill_zero":
            scores = scores.masked_fill(mask, 0.0)
        elif kind == "masked_fill_small":
            scores = scores.masked_fill(mask, -5.0)
        elif kind in ("mask_broadcasts_batch", "mask_5d"):
            scores = scores + mask
        elif kind == "tanh_not_softcap":
            scores = torch.tanh(scores / 5.0) * 4.0
        elif kind == "mask_minus_scores":
            scores = mask - scores
        elif kind == "mask_changed_in_place":
            scores = scores + mask
            mask.view(-1).mul_(0.5)
        elif kind == "runtime_scale_after_mask":
            scores = (scores + mask) / t
        elif kind == "scores_returned":
            extra = (scores,)
        if kind == "softmax_dim_m2":
            probs = F.softmax(scores, dim=-2)
        elif kind == "softmax_dim1":
            probs = scores.softmax(dim=1)
        elif kind == "softmax_implicit_dim":
            probs = F.softmax(scores)
        elif kind == "log_softmax":
            probs = F.log_softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1)
        if kind == "k_changed_in_place":
            k.mul_(2.0)
        elif kind == "q_changed_in_place":
            q.view(-1).add_(1.0)
        elif kind == "k_row_assigned":
            k[:, :, 0] = 0.0
        elif kind == "k_view_written":
            k.view(-1)[:5] = 0.0
            v = v + k
        if kind == "probs_returned":
            extra = (probs,)
        elif kind == "probs_reused":
            extra = (probs.sum(-2),)
        elif kind == "probs_times_two":
            probs = probs * 2
        elif kind == "probs_plus":
            probs = probs + 0.1
        elif kind == "probs_pow":
            probs = probs.pow(2)
        elif kind == "probs_sqrt":
            probs = probs.sqrt()
        elif kind == "probs_transposed":
            probs = probs.transpose(-2, -1)
        out = torch.einsum("bhls,bhsd->bhld", probs, v) if self.qk == "einsum" else torch.matmul(probs, v)
        if kind == "inplace_scale_view_read":
            out = out + first.sum()
        return (out, *extra) if extra else out


@st.composite
def near_misses(draw):
    kind = draw(st.sampled_from(sorted(NEAR_MISSES)))
    B = draw(st.integers(2, 3)) if kind in ("mask_broadcasts_batch", "kv_broadcast_batch") else draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    L = 2 * draw(st.integers(1, 12)) if kind == "view_regroups_query" else draw(st.integers(1, 24))
    S = L if kind == "probs_transposed" else draw(st.integers(1, 24))
    E = draw(st.sampled_from([1, 4, 8, 13]))
    scale = draw(st.floats(0.05, 1.5))
    # matmul broadcasts batches and takes transposed probabilities; the einsum spelling is kept to the others
    plain = kind in ("mask_broadcasts_batch", "mask_5d", "kv_broadcast_batch", "probs_transposed", "k_changed_in_place")
    qk = draw(st.sampled_from(["matmul", "at"] if plain else ["matmul", "at", "einsum"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    return kind, B, H, L, S, E, scale, qk, dtype, seed


def near_miss_inputs(kind, B, H, L, S, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv_batch = 1 if kind == "mask_broadcasts_batch" else B
    kv_batch = 1 if kind == "kv_broadcast_batch" else qkv_batch
    q = torch.randn((qkv_batch, H, L, E), generator=g, dtype=dtype)
    k = torch.randn((kv_batch, H, S, E), generator=g, dtype=dtype)
    v = torch.randn((kv_batch, H, S, E), generator=g, dtype=dtype)
    if kind in ("masked_fill_zero", "masked_fill_small"):
        mask = torch.rand((B, 1, L, S), generator=g) > 0.6
    elif kind == "mask_broadcasts_batch":
        mask = torch.randn((B, 1, L, S), generator=g, dtype=dtype)
    elif kind == "mask_5d":
        mask = torch.randn((2, B, 1, L, S), generator=g, dtype=dtype)
    elif kind in ("mask_minus_scores", "mask_changed_in_place", "runtime_scale_after_mask"):
        mask = torch.randn((B, 1, L, S), generator=g, dtype=dtype)
    else:
        mask = None
    if kind == "runtime_scale_after_mask":
        return q, k, v, mask, torch.tensor(2.0, dtype=dtype)
    return q, k, v, mask


@given(near_misses())
@budget(0.5)
def test_near_miss_is_left_alone_and_exact(problem):
    """A program that is not attention (or that asam refuses on purpose) keeps its softmax, says why, and
    the compiled program computes what eager does."""
    kind, B, H, L, S, E, scale, qk, dtype, seed = problem
    model = NearMiss(kind, scale, qk, H).eval()
    inputs = near_miss_inputs(kind, B, H, L, S, E, dtype, seed)
    with torch.no_grad():
        eager = model(*inputs)
    _, out, cap = compile_and_run(model, inputs)
    cands = cap.report.candidates
    msg = f"{problem}\n{candidate_summary(cands)}"
    note(msg)
    assert len(cands) == 1, msg
    (cand,) = cands
    expected = NEAR_MISSES[kind]  # a reason, a tuple of acceptable ones, or None: any
    expected = (expected,) if isinstance(expected, Reject) else expected
    assert cand.status == "refused" and (expected is None or cand.reject in expected), \
        f"expected {'any reason' if expected is None else [e.name for e in expected]}: {msg}"
    assert cap.n_rewritten == 0 and count_sdpa(cap.graphs) == 0, msg
    # The graph still holds the softmax (or log_softmax) it was given.
    text = "\n".join(g.code for g in cap.graphs)
    assert "softmax" in text, msg
    outs, refs = flat_tensors(out), flat_tensors(eager)
    assert len(outs) == len(refs), msg
    for o, r in zip(outs, refs):
        # Nothing was rewritten: the same ops in the same order give the same numbers.
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12, equal_nan=True,
                                   msg=lambda m: f"{m}\n{msg}")


@given(near_misses().filter(lambda p: p[0] in ("probs_times_two", "probs_plus", "per_head_scale",
                                                 "mask_broadcasts_batch", "kv_broadcast_batch")))
@budget(0.05)
def test_near_miss_gradients_match_eager(problem):
    """Backward through a refused site is eager's backward."""
    kind, B, H, L, S, E, scale, qk, dtype, seed = problem
    model = NearMiss(kind, scale, qk, H).eval()
    inputs = near_miss_inputs(kind, B, H, L, S, E, dtype, seed)
    eager, weights = input_grads(model, inputs, [0, 1, 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options=OPTIONS, fullgraph=True)
    with asam_compile.capture() as cap:
        grads, _ = input_grads(compiled, inputs, [0, 1, 2], weights)
    assert cap.n_rewritten == 0, candidate_summary(cap.report.candidates)
    for g, g_eager in zip(grads, eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([-1, 1, 3]), st.integers(0, 2**16))
@budget(0.05)
def test_value_length_differs_from_keys_fails_like_eager(L, S, dS, seed):
    """Values whose length is not the keys': eager raises, and so does the compiled program (no rewrite
    turns an invalid program into one that runs)."""
    assume(S + dS >= 1)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn((2, 2, L, 8), generator=g), torch.randn((2, 2, S, 8), generator=g)
    v = torch.randn((2, 2, S + dS, 8), generator=g)
    model = NearMiss("none", 0.3, "matmul", 2)
    with pytest.raises(RuntimeError):
        model(q, k, v, None)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options=OPTIONS, fullgraph=True)
    with asam_compile.capture() as cap, pytest.raises(RuntimeError):
        compiled(q, k, v, None)
    assert cap.n_rewritten == 0


# ------------------------------------------------------------------------------------------- the first property


MASK_KINDS = ("none", "additive", "bool", "causal")


class Attention(nn.Module):
    """One hand-written attention whose scale, mask spelling and K/V head grouping are parameters."""

    def __init__(self, scale: float, mask_kind: str, n_rep: int):
        super().__init__()
        self.scale, self.mask_kind, self.n_rep = scale, mask_kind, n_rep

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if self.mask_kind == "additive":
            scores = scores + mask
        elif self.mask_kind == "bool":
            scores = scores.masked_fill(~mask, float("-inf"))
        elif self.mask_kind == "causal":
            l, s = scores.shape[-2:]
            scores = scores + torch.triu(torch.full((l, s), float("-inf"), device=q.device), 1)
        return torch.matmul(scores.softmax(dim=-1), v)


@st.composite
def problems(draw):
    b = draw(st.integers(1, 3))
    hkv = draw(st.sampled_from([1, 2, 3]))
    n_rep = draw(st.sampled_from([1, 2, 4]))
    l = draw(st.integers(1, 40))
    s = draw(st.integers(1, 40))
    e = draw(st.sampled_from([1, 3, 8, 13, 16, 24]))
    scale = draw(st.floats(0.01, 2.0))
    kind = draw(st.sampled_from(MASK_KINDS))
    seed = draw(st.integers(0, 2**16))
    return b, hkv, n_rep, l, s, e, scale, kind, seed


def make_problem_inputs(b, hkv, n_rep, l, s, e, kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((b, hkv * n_rep, l, e), generator=g)
    k = torch.randn((b, hkv, s, e), generator=g)
    v = torch.randn((b, hkv, s, e), generator=g)
    keep = torch.rand((b, 1, l, s), generator=g) > 0.4
    keep[..., 0] = True  # no fully masked row
    if kind == "additive":
        mask = torch.randn((b, 1, l, s), generator=g).masked_fill(~keep, float("-inf"))
    else:
        mask = keep
    return q, k, v, mask


@given(problems())
@budget(0.1)
def test_random_attention_is_rewritten_and_exact(problem):
    b, hkv, n_rep, l, s, e, scale, kind, seed = problem
    torch._dynamo.reset()
    model = Attention(scale, kind, n_rep)
    inputs = make_problem_inputs(b, hkv, n_rep, l, s, e, kind, seed)
    compiled = torch.compile(model, backend="asam", options=OPTIONS, fullgraph=True)
    with asam_compile.capture() as cap, torch.no_grad():
        out = compiled(*inputs)
    cands = cap.report.candidates
    assert len(cands) == 1 and cands[0].status == "rewritten", f"{problem}\n{candidate_summary(cands)}"
    info = cands[0].info
    assert count_sdpa(cap.graphs) == 1 and count_softmax(cap.graphs) == 0
    if kind == "causal" and s > 1:  # with one key the causal mask masks nothing: "none" is right too
        assert info["is_causal"] is True, f"{problem}\n{candidate_summary(cands)}"
    if kind in ("none", "causal") and n_rep > 1:
        assert info["enable_gqa"] is True, f"{problem}\n{candidate_summary(cands)}"
    ref = model(*to_double(inputs))
    assert_no_worse(max_abs_err(out, ref), max_abs_err(model(*inputs), ref), str(problem))


# ------------------------------------------------------------------------------------------- regressions
# Found by test_equivalent_spelling_is_rewritten_and_exact; fixed in passes/match.py.


class EinsumKeysFirst(nn.Module):
    def forward(self, q, k, v):
        scores = torch.einsum("bhsd,bhld->bhls", k, q) * 0.25
        return torch.einsum("bhsd,bhls->bhld", v, scores.softmax(-1))


class RepeatKVPermutedKeys(nn.Module):
    def forward(self, q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        return torch.matmul(torch.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)) * 0.25, dim=-1), v)


@pytest.mark.parametrize(
    "model, hkv, gqa",
    [(EinsumKeysFirst(), 4, False), (RepeatKVPermutedKeys(), 2, True)],
    ids=["einsum_keys_first", "repeat_kv_permuted_keys"],
)
def test_regression_spellings(model, hkv, gqa):
    """einsum with K as its first operand was refused (EINSUM_UNSUPPORTED); Kᵀ written as a permute kept the
    rewrite from seeing repeated K/V heads (no enable_gqa)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn((2, 4, 11, 16), generator=g)
    k, v = torch.randn((2, hkv, 13, 16), generator=g), torch.randn((2, hkv, 13, 16), generator=g)
    _, out, cap = compile_and_run(model, (q, k, v))
    (cand,) = cap.report.candidates
    assert cand.status == "rewritten" and cand.info["enable_gqa"] is gqa, candidate_summary([cand])
    ref = model(*to_double((q, k, v)))
    assert_no_worse(max_abs_err(out, ref), max_abs_err(model(q, k, v), ref), type(model).__name__)


class ChangedInPlace(nn.Module):
    """q, k or the mask changed in place after the scores are made, before the value matmul."""

    def __init__(self, which: str):
        super().__init__()
        self.which = which

    def forward(self, q, k, v, mask):
        q, k, mask = q.clone(), k.clone(), mask.clone()
        probs = (q @ k.transpose(-2, -1) * 0.25 + mask).softmax(-1)
        if self.which == "k":
            k.mul_(2.0)
        elif self.which == "q":
            q += 1.0
        elif self.which == "q_view":
            q.view(-1)[:3] += 1.0
        elif self.which == "k_row":
            k[:, :, 0] = 0.0
        else:
            mask.zero_()
        return probs @ v


@pytest.mark.parametrize("which", ["k", "q", "q_view", "k_row", "mask"])
@pytest.mark.parametrize("inductor", [False, True], ids=["no-inductor", "inductor"])
def test_regression_tensor_changed_in_place_inside_the_pattern(which, inductor):
    """The rewrite used to read q, k and the mask at the value matmul, after the in-place change: a wrong result
    (max error 0.9-1.4 here). Now refused (Note [Tensors changed in place inside the pattern]), except `q += 1`
    on q read directly (no view of it): made out of place (Note [In-place arithmetic on a fresh tensor]), the
    rewrite reads the old q, like the original."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((2, 2, 5, 8), generator=g) for _ in range(3))
    mask = torch.randn((2, 1, 5, 5), generator=g)
    model = ChangedInPlace(which)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asam", options={**OPTIONS, "inductor": inductor}, fullgraph=True)
    with asam_compile.capture() as cap, torch.no_grad():
        out = compiled(q, k, v, mask)
    (cand,) = cap.report.candidates
    if which == "q":
        assert cand.status == "rewritten", candidate_summary([cand])
    else:
        assert cand.status == "refused" and cand.reject is Reject.CHANGED_IN_PLACE and "in place" in cand.detail, \
            candidate_summary([cand])
    torch.testing.assert_close(out, model(q, k, v, mask), atol=1e-6, rtol=1e-5)
