"""asam against PyTorch Inductor's own attention patterns (torch/_inductor/fx_passes/fuse_attention.py).

Every `_sfdp_pattern_<N>` of torch 2.13 (copied verbatim into tests/sfdp_patterns.py: Dynamo does not trace
functions inside torch's own files) is compiled with `backend="asam"` on float32 CPU inputs built the way
`_get_sfdp_patterns` builds its example inputs: the same shapes (q/k/v (2, 4, 8, 16), the permuted
(2, 8, 4, 16), the non-contiguous strided one of pattern 28, the batch-size-1 variants "-bs1"), the same masks
(float (1, 1, 8, 8) and (2, 1, 1, 4), bool, 2-D (2, 4)), the same scale values (2.0 where the pattern takes
the scale as an argument, the Python float 0.66666 where Inductor's `scalar_workaround` fixes it) and the same
dropout p (0.113377). Values are random normals, masks realistic (padding, causal). Each case checks that

  (a) the rewrite fired (`cap.n_rewritten >= 1`),
  (b) the output is as close to a float64 eager run of the same function as eager float32 is
      (compiled error <= 4 * eager error + 1e-5),
  (c) so are the gradients of q, k, v and of a float mask that reaches the scores additively.

The scale argument (patterns 1-4, 11, 12, 14-17, 28) is the Python float 2.0: Inductor traces these patterns
with a 0-d tensor c() but its _sfdp_extra_check only lets a float/int scale match, as real models pass it
(math.sqrt(head_dim)). The "-tensor_scale" cases pass the 0-d tensor as well; neither Inductor nor asam
rewrites them.

Dropout makes the output random, so the numerical cases run with dropout_p=0.0 (Inductor's own inference
patterns do the same), and `test_sfdp_dropout_carried_over` checks, with p = 0.113377 and training
semantics, that the rewrite fired and the SDPA call carries that p.

Cases asam does not rewrite today are strict xfails whose reason is the rejection asam reports
(`Candidate.reason`); `test_sfdp_rejection_reasons` keeps those reasons honest.

Pattern 13's 3-D inputs are (1024, 128, 128) in Inductor; here (16, 32, 16) (same rank and structure) to keep
the file fast.

`test_sfdp_plain_inductor_reference` counts, for reference, the patterns plain Inductor rewrites on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx

import asam_compile
import sfdp_patterns as P

INV_SCALE = 0.66666  # Inductor's scalar_workaround "inv_scale"
DROPOUT_P = 0.113377  # Inductor's scalar_workaround "dropout_p"
C_SCALE = 2.0  # Inductor's c(): torch.tensor(2.0)

# ------------------------------------------------------------------------------------------------ inputs
# Each maker returns a fresh float32 tensor (bool for the bool masks); `gen` makes the values reproducible.


def _g(gen, *shape):
    return torch.randn(*shape, generator=gen)


def g(gen):  # g_inp: q/k/v (2, 4, 8, 16)
    return _g(gen, 2, 4, 8, 16)


def g_bs1(gen):
    return _g(gen, 1, 4, 8, 16)


def gp(gen):  # gp_inp: [B, S, H, D], permuted to [B, H, S, D] inside the pattern
    return _g(gen, 2, 8, 4, 16)


def gp_bs1(gen):
    return _g(gen, 1, 8, 4, 16)


def gn(gen):  # gn_inp: non-contiguous (2, 6, 16, 8) with strides (2304, 128, 1, 16)
    t = torch.empty_strided((2, 6, 16, 8), (2304, 128, 1, 16))
    return t.copy_(_g(gen, 2, 6, 16, 8))


def g_3d(gen):  # g_3d_inp is (1024, 128, 128) in Inductor
    return _g(gen, 16, 32, 16)


def b(gen):  # b_inp: float additive mask / bias (1, 1, 8, 8)
    return _g(gen, 1, 1, 8, 8)


def b_bool(gen):  # bool (1, 1, 8, 8): a causal mask
    return torch.ones(8, 8, dtype=torch.bool).tril().view(1, 1, 8, 8)


def m(gen):  # m_inp: float additive mask (2, 1, 1, 4)
    return _g(gen, 2, 1, 1, 4)


def m_bs1(gen):
    return _g(gen, 1, 1, 1, 4)


def m_bool(gen):  # bool (2, 1, 1, 4): key padding, True = keep
    return torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool).view(2, 1, 1, 4)


def m_bs1_bool(gen):
    return torch.tensor([[1, 1, 1, 0]], dtype=torch.bool).view(1, 1, 1, 4)


def m_2d(gen):  # m_inp_2d: float (2, 4) padding mask, 1 = keep, 0 = pad (DistilBert)
    return torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def c(gen):  # c_inp: the scale 2.0, a 0-d tensor in Inductor's trace (see Case.tensor_scale)
    return torch.tensor(C_SCALE)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    pattern: Callable[..., Any]
    makers: tuple[Callable[..., torch.Tensor], ...]  # positional tensor arguments after fn's signature
    scalars: tuple[str, ...] = ()  # "inv_scale" / "dropout_p": keyword scalars (Inductor's scalar_workaround)
    tensor_scale: bool = False  # pass c() as the 0-d tensor of Inductor's trace instead of the Python float 2.0
    # A dtype the pattern itself casts to whatever its inputs are (7-10: probabilities and values .to(float16)).
    # The float64 run then rounds the same way as eager float32 and is no float64 reference of the attention:
    # eager's error against it is 0 while a rewrite that keeps more precision differs by an ulp. Such cases
    # allow one rounding of that dtype at the tensor's magnitude on top of the float32 criterion.
    inner_dtype: torch.dtype | None = None

    @property
    def number(self) -> int:
        return int(self.pattern.__name__.rsplit("_", 1)[1])

    def inputs(self, seed: int = 0) -> list[Any]:
        gen = torch.Generator().manual_seed(seed)
        return [C_SCALE if (make is c and not self.tensor_scale) else make(gen) for make in self.makers]

    def call(self, dropout_p: float = 0.0) -> Callable[..., Any]:
        kwargs = {}
        if "inv_scale" in self.scalars:
            kwargs["inv_scale"] = INV_SCALE
        if "dropout_p" in self.scalars:
            kwargs["dropout_p"] = dropout_p
        return functools.partial(self.pattern, **kwargs) if kwargs else self.pattern


def _case(n: int, makers, scalars=(), suffix="") -> Case:
    inner = torch.float16 if n in (7, 8, 9, 10) else None
    return Case(f"{n}{suffix}", getattr(P, f"_sfdp_pattern_{n}"), tuple(makers), tuple(scalars), False, inner)


D, S, SD = ("dropout_p",), ("inv_scale",), ("inv_scale", "dropout_p")

# The float32 candidates of _get_sfdp_patterns, in its order. The scale argument of the patterns that take it
# (c) comes before dropout_p, which is always passed by keyword.
CASES: list[Case] = [
    _case(1, [g, g, g, c]),
    _case(2, [g, g, g, c]),
    _case(3, [g, g, g, c], D),
    _case(4, [g, g, g, c], D),
    _case(5, [g, g, g, b], S),
    _case(6, [g, g, g, b], SD),
    _case(7, [g, g, g], SD),
    _case(8, [g, g, g], S),
    _case(9, [g, g, g], SD),
    _case(10, [g, g, g], S),
    _case(11, [g, g, g, c]),
    _case(12, [g, g, g, c], D),
    _case(13, [g_3d, g_3d, g_3d], D),
    _case(14, [g, g, g, m, c]),
    _case(15, [g, g, g, m_2d, c]),
    _case(16, [g, g, g, m, c], D),
    _case(16, [g_bs1, g_bs1, g_bs1, m_bs1, c], D, "-bs1"),
    _case(17, [g, g, g, m_2d, c], D),
    _case(18, [g, g, g, m_bool], SD),
    _case(18, [g_bs1, g_bs1, g_bs1, m_bs1_bool], SD, "-bs1"),
    _case(19, [g, g, g, b_bool, b], SD),
    _case(20, [g, g, g, m_2d], SD),
    _case(21, [g, g, g, m]),
    _case(21, [g_bs1, g_bs1, g_bs1, m_bs1], (), "-bs1"),
    _case(22, [g, g, g, m]),
    _case(22, [g_bs1, g_bs1, g_bs1, m_bs1], (), "-bs1"),
    _case(23, [g, g, g]),
    _case(23, [g_bs1, g_bs1, g_bs1], (), "-bs1"),
    _case(24, [g, g, g, b]),
    _case(25, [g, g, g, m], D),
    _case(25, [g_bs1, g_bs1, g_bs1, m_bs1], D, "-bs1"),
    _case(26, [g, g, g, m], D),
    _case(26, [g_bs1, g_bs1, g_bs1, m_bs1], D, "-bs1"),
    _case(27, [g, g, g], D),
    _case(27, [g_bs1, g_bs1, g_bs1], D, "-bs1"),
    _case(28, [gn, gn, gn, c], D),
    _case(29, [gp, gp, gp, b], S),
    _case(29, [gp_bs1, gp_bs1, gp_bs1, b], S, "-bs1"),
    _case(30, [gp, gp, gp], S),
    _case(30, [gp_bs1, gp_bs1, gp_bs1], S, "-bs1"),
]
# The same structures with the scale as the 0-d tensor that Inductor traces them with. Inductor itself does not
# rewrite these (_sfdp_extra_check wants a float/int scale) and crashes on 16-bs1 (SDPA gets a tensor scale).
CASES += [dataclasses.replace(cs, id=cs.id + "-tensor_scale", tensor_scale=True) for cs in list(CASES) if c in cs.makers]

# ------------------------------------------------------------------------------------- what asam misses
# The reason asam gives today (the first refused Candidate.reason, or why there is no candidate at all), per
# case id. test_sfdp_rejection_reasons fails when one changes, so that this table and the xfails stay true.
NO_CANDIDATE = "no attention candidate: no softmax the matcher recognises"
_SCALE_DIV = "the scale is a tensor (e.g. per head) that cannot be folded exactly (div multiplies by a tensor)"
_SCALE_MUL = "the scale is a tensor (e.g. per head) that cannot be folded exactly (mul multiplies by a tensor)"
_SCORES_ESCAPE = "attention scores are used outside the pattern ({})"
MISSES: dict[str, str] = {}  # every pattern, with a float or a 0-d tensor scale, is rewritten today


def _params(cases: list[Case]) -> list[Any]:
    out = []
    for cs in cases:
        marks = [pytest.mark.xfail(strict=True, reason=MISSES[cs.id])] if cs.id in MISSES else []
        out.append(pytest.param(cs, id=cs.id, marks=marks))
    return out


# ------------------------------------------------------------------------------------------------ checks


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        y = torch.empty_strided(x.shape, x.stride(), dtype=torch.float64)  # keep pattern 28's layout
        return y.copy_(x.detach())
    return x


def _grad_positions(args: list[Any]) -> list[int]:
    """q, k, v and every float tensor argument of more than 0 dims (masks); the 0-d tensor scale is not
    differentiated, as in Inductor's c()."""
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0]


def _run(fn: Callable[..., Any], args: list[Any], weights: list[torch.Tensor] | None = None):
    """fn(*args) with requires_grad on the float tensors; returns (outputs, grads (None: unused), weights)."""
    args = [a.detach().requires_grad_(False) if isinstance(a, torch.Tensor) else a for a in args]
    pos = _grad_positions(args)
    for i in pos:
        args[i].requires_grad_(True)
    outs = _flat(fn(*args))
    if weights is None:
        gen = torch.Generator().manual_seed(1234)
        weights = [torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5 for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights) if o.requires_grad)
    grads = torch.autograd.grad(loss, [args[i] for i in pos], allow_unused=True)
    return [o.detach() for o in outs], list(grads), weights


def _err(x: torch.Tensor | None, ref: torch.Tensor | None, what: str) -> float:
    if ref is None:
        assert x is None, f"{what}: has a gradient where the reference has none"
        return 0.0
    assert x is not None, f"{what}: no gradient where the reference has one"
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} vs {tuple(ref.shape)}"
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), f"{what}: non-finite values differ from the reference"
    return (x[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def _compile_and_run(cs: Case, dropout_p: float = 0.0):
    fn = cs.call(dropout_p)
    args = cs.inputs()
    compiled = torch.compile(fn, backend="asam", options={"inductor": False}, fullgraph=True)
    with asam_compile.capture() as cap:
        result = _run(compiled, args)
    return fn, args, cap, result


def _reason(cap) -> str:
    """Why nothing was rewritten: the first refused candidate's reason (or that there was no candidate)."""
    cands = cap.report.candidates
    if not cands:
        return NO_CANDIDATE
    refused = [x for x in cands if x.status == "refused"]
    return refused[0].reason if refused else "; ".join(f"{x.site}: {x.status}" for x in cands)


@pytest.mark.parametrize("cs", _params(CASES))
def test_sfdp_pattern(cs: Case):
    fn, args, cap, (outs, grads, weights) = _compile_and_run(cs)
    assert cap.n_rewritten >= 1, f"pattern {cs.id} not rewritten: {_reason(cap)}"

    ref_outs, ref_grads, _ = _run(fn, [_double(a) for a in args], weights)
    eager_outs, eager_grads, _ = _run(fn, args, weights)

    def check(x, e, r, what):
        err, eager_err = _err(x, r, what), _err(e, r, "eager " + what)
        slack = 1e-5
        if cs.inner_dtype is not None and r is not None:
            slack += torch.finfo(cs.inner_dtype).eps * r.abs().max().item()
        assert err <= 4 * eager_err + slack, (
            f"{what}: error {err:.3g} vs float64 > 4 * eager float32's {eager_err:.3g} + {slack:.3g}"
        )

    assert len(outs) == len(ref_outs)
    for i, (o, e, r) in enumerate(zip(outs, eager_outs, ref_outs)):
        assert o.dtype == e.dtype, f"output {i}: dtype {o.dtype}, eager gives {e.dtype}"
        check(o, e, r, f"output {i}")
    for i, (gr, e, r) in enumerate(zip(grads, eager_grads, ref_grads)):
        check(gr, e, r, f"grad of argument {_grad_positions(args)[i]}")


def _sdpa_nodes(gms: list[fx.GraphModule]) -> list[fx.Node]:
    targets = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
    return [n for gm in gms for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


DROPOUT_CASES = [cs for cs in CASES if "dropout_p" in cs.scalars and "-bs1" not in cs.id]


@pytest.mark.parametrize("cs", _params(DROPOUT_CASES))
def test_sfdp_dropout_carried_over(cs: Case):
    """With p > 0 (training semantics) the output is random: check the rewrite and the p it carries."""
    _, _, cap, (outs, _, _) = _compile_and_run(cs, dropout_p=DROPOUT_P)
    assert cap.n_rewritten >= 1, f"pattern {cs.id} with dropout not rewritten: {_reason(cap)}"
    assert all(torch.isfinite(o).all() for o in outs)
    ps = [n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0) for n in _sdpa_nodes(cap.graphs)]
    assert ps and all(p == pytest.approx(DROPOUT_P) for p in ps), f"SDPA dropout_p {ps}, expected {DROPOUT_P}"


@pytest.mark.parametrize("cs", [pytest.param(cs, id=cs.id) for cs in CASES if cs.id in MISSES])
def test_sfdp_rejection_reasons(cs: Case):
    """The reasons of the xfails above are what asam reports today."""
    _, _, cap, _ = _compile_and_run(cs)
    assert cap.n_rewritten == 0
    assert _reason(cap) == MISSES[cs.id]


# -------------------------------------------------------------------------------- plain Inductor, for reference
# Which of the same cases torch 2.13's own pass (fuse_attention) rewrites on CPU: inference (no_grad,
# dropout_p=0.0, Inductor's "_inference" patterns), default backend, one case per pattern. All 30 fire; they
# compile fast because a fired graph is one SDPA call (only the first compile pays Inductor's start-up).
# The "-tensor_scale" variants are left out: Inductor rewrites none of them (_sfdp_extra_check wants a
# float/int scale) and crashes on 16-bs1-tensor_scale.
INDUCTOR_CATCHES_2_13 = frozenset(range(1, 31))


@pytest.mark.slow
def test_sfdp_plain_inductor_reference():
    from torch._dynamo.utils import counters

    fired = set()
    for cs in CASES:
        if "-" in cs.id:  # one case per pattern: no -bs1, no -tensor_scale
            continue
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            torch.compile(cs.call(), fullgraph=True)(*cs.inputs())
        if counters["inductor"]["fuse_attention"] > 0:
            fired.add(cs.number)
    print(f"plain Inductor rewrites {len(fired)} of 30 patterns on CPU: {sorted(fired)}")
    if torch.__version__.startswith("2.13."):
        assert fired == INDUCTOR_CATCHES_2_13, f"missed: {sorted(INDUCTOR_CATCHES_2_13 - fired)}"
