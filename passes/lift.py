"""lift: turn the FX subgraph that computes a mask into a function of (b, h, q_idx, kv_idx) indices.

    q = arange(L)[None, None, :, None]; kv = arange(S)[None, None, None, :]        (FX nodes)
    mask = where((kv <= q).expand(B, -1, L, S), tensor(0.0), finfo.min)
      ->  Lifted(fn=lambda b, h, q_idx, kv_idx: where(kv_idx <= q_idx, 0.0, finfo.min), axes={"q", "kv"})

The functions are FlexAttention mask_mod material: they take index tensors of any broadcastable shapes
(0-d tensors under vmap, broadcast grids in asam_compile.kernels.block_mask) and never materialise L x S.
Never mutates the graph.

Dynamic shapes (torch.compile(dynamic=True)): sizes are SymInts (graph inputs such as `s0`, and entries of
the FakeTensor shapes in node.meta["example_value"]). One graph serves every length, so a lifted function
must be right for every value of the size symbols. A symbol is therefore accepted only where the lifted
value does not depend on it: the end of an arange (start and step are constants), target sizes of
expand / broadcast_to / view / reshape (which only add or drop size-1 dims or broadcast), the stop of a
slice with start 0 and step 1 (`bias[:, :, :T, :T]`), sizes of factories (`ones(s0, s0)`), and shapes that
are only read. Any use of a symbol's value in the mask's arithmetic (`arange(s0) + (s1 - s0)`, `q - s0 // 2`,
`kv < s0`, `full((s0,), s0)`, a slice starting at `-s0`) raises NotLiftable naming the symbol.
See Note [Symbolic sizes].
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.passes.lift_graph import (
    _SYM_TYPES,
    _fetch_attr,
    _hint_shape,
    _is_backed,
    _is_size_like,
    _is_small,
    _mutation,
    _op_name,
    _placeholder_kind,
    _runtime_inputs,
    _standin,
    _sym_str,
    _symbols_in,
    ancestors,
)
from asam_compile.passes.mask_names import name_mask, sample_grid

log = logging.getLogger(__name__)

Tensor = torch.Tensor
AXES = ("b", "h", "q", "kv")

# A score at or below this is a removed key (see LARGE_NEGATIVE in passes/match.py); used for names only.
_REMOVED = -1e4


class NotLiftable(Exception):
    """The mask subgraph is not index arithmetic on constants. str(e) says why, for users."""


@dataclasses.dataclass
class Lifted:
    """One lifted node: its value at (b, h, q_idx, kv_idx), right-aligned to the scores (B, H, L, S)."""

    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    # Axes the value may depend on (a superset: `kv - kv` still counts as kv). Axes not listed can be
    # given a single index (B=1 / H=1 in a block mask) without changing the result.
    axes: frozenset[str]
    # The node's own shape (it broadcasts to the scores from the right), as Dynamo recorded it: under dynamic
    # shapes its entries may be SymInts (e.g. (s0, 1, s1, s1)); fn is right for every value of them.
    shape: tuple[int | torch.SymInt, ...] = ()
    dtype: torch.dtype = torch.bool  # the node's dtype; fn returns this dtype
    # Tensors fn reads (buffers, constants) with the nodes that make them, shared by all nodes of one lift()
    captures: tuple["Capture", ...] = ()


# Note [Lifted values]
# A _Value stands for one tensor node: its shape and dtype (exactly those of the graph), and `fn(idx, ref)`
# giving its elements at index `idx`, a tuple with one entry per dim: an index tensor or a python int.
# All index tensors live in one broadcast "index space" (the caller's b, h, q, kv grids, or 0-d tensors
# under vmap), so results of different nodes combine by plain broadcasting; view ops only re-route
# indices and cost nothing at run time. Two rules keep this exact:
#  - `deps` lists the dims whose index fn reads, and holds only dims of size > 1. A dim of size 1 is never
#    read, so broadcasting and expand can pass it any index.
#  - Every elementwise op casts its operands to the dtype the graph computed it in. A constant lifted as a
#    0-d tensor would otherwise lose to a 0-d operand of another dtype in type promotion, where the
#    original (a full tensor) won.
# `ref` is one of the caller's index tensors: constants are made on its device.

# Note [Symbolic sizes]
# Under dynamic shapes a _Value's `shape` still holds plain ints: every size symbol is replaced by a
# "stand-in", a distinct large prime (see _Lifter.probe), and all shape reasoning (broadcasting, views,
# meta tensors) runs on those ints. Nothing ever compares or computes with a SymInt itself, so lifting
# adds no guard to Dynamo's shape environment (no recompiles, no specialisation). A stand-in is far from
# any real size, so a symbolic dim counts as "big" (size > 1); _Lifter.value() checks that the shape
# environment proves it >= 2 for every allowed value. The stand-in never reaches an index function: a
# SymInt stays a SymInt in the interpreter's environment (a "size token"), it is probed only where it
# is a size, and every op that would use it as a value refuses (_Lifter._no_symbols).
# `sym_shape` is the shape in Dynamo's terms (ints and SymInts), taken from the node's example value
# after checking that it probes to `shape`; it is what Lifted.shape reports.

_Index = tuple  # one entry per dim: Tensor | int
_Fn = Callable[[_Index, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class _Value:
    shape: tuple[int, ...]  # stand-ins for symbolic sizes, see Note [Symbolic sizes]
    dtype: torch.dtype
    deps: frozenset[int]
    fn: _Fn
    sym_shape: tuple[Any, ...] | None = None  # Dynamo's shape (ints, SymInts) where it has symbols

    def meta(self) -> Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def _const(shape: Sequence[int], dtype: torch.dtype, value: Any) -> _Value:
    def const(idx: _Index, ref: Tensor) -> Tensor:
        return torch.full((), value, dtype=dtype, device=ref.device)

    return _Value(tuple(shape), dtype, frozenset(), const)


@dataclasses.dataclass(eq=False)
class Capture:
    """A tensor a lifted function reads (a module buffer, a tensor constant), and the graph node that makes
    it. `tensor` is the real value at compile time; whoever runs the function inside a traced graph rebinds
    it to that node's traced value (see Note [Captured tensors in Flex] in passes/flex_plan.py)."""

    node: fx.Node | None
    tensor: Tensor
    # True for a value read from a runtime input (Note [Masks read at run time]): `tensor` is then only
    # the example's value, and a block mask must be built from the traced value on every call.
    runtime: bool = False


def _captured(
    t: Tensor, node: fx.Node | None = None, sink: list[Capture] | None = None, runtime: bool = False
) -> _Value:
    """A tensor read at the index: FlexAttention supports captured tensors."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    holder = Capture(node, t, runtime)
    if sink is not None and node is not None:
        sink.append(holder)

    def captured(idx: _Index, ref: Tensor) -> Tensor:
        sq = holder.tensor.squeeze()  # a view: a later in-place edit of a buffer is seen, as in the original
        if not dims:
            return sq
        return sq[tuple(idx[d] for d in dims)]

    return _Value(tuple(t.shape), t.dtype, frozenset(dims), captured)


def _reindex(src: _Value, shape: Sequence[int], routes: list[tuple[int | None, int, int]]) -> _Value:
    """A view of `src`: src dim d reads index `start + step * idx[k]` for routes[d] = (k, start, step), or
    the constant `start` where k is None. Costs nothing at run time beyond that arithmetic."""
    shape = tuple(shape)
    plan = []
    for d, (k, start, step) in enumerate(routes):
        if d not in src.deps:
            continue
        if k is None or shape[k] == 1:
            plan.append((d, None, start, 0))
        else:
            plan.append((d, k, start, step))
    deps = frozenset(k for _, k, _, _ in plan if k is not None)
    n_src = len(src.shape)
    if all(k == d and (start, step) == (0, 1) for d, k, start, step in plan) and len(shape) == n_src:
        return _Value(shape, src.dtype, deps, src.fn)
    src_fn = src.fn

    def view(idx: _Index, ref: Tensor) -> Tensor:
        src_idx: list[Any] = [0] * n_src
        for d, k, start, step in plan:
            if k is None:
                src_idx[d] = start
            else:
                i = idx[k]
                src_idx[d] = i if (start, step) == (0, 1) else i * step + start
        return src_fn(tuple(src_idx), ref)

    return _Value(shape, src.dtype, deps, view)


# ---------------------------------------------------------------------------------------------------
# op tables

_ELEMENTWISE_KIND: dict[Any, str] = {}
for _fn in (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
            operator.neg, operator.pos, operator.abs, operator.and_, operator.or_, operator.xor, operator.invert,
            torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
            torch.true_divide, torch.floor_divide, torch.remainder, torch.fmod, torch.neg, torch.negative,
            torch.abs, torch.minimum, torch.maximum, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
            torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor, torch.bitwise_not, torch.sign,
            # float maths on positions, for index-built biases (ALiBi slopes, log-spaced relative buckets)
            operator.pow, torch.pow, torch.exp, torch.exp2, torch.log, torch.log2, torch.sqrt, torch.rsqrt):
    _ELEMENTWISE_KIND[_fn] = "arith"
for _fn in (operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
            torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.less, torch.less_equal,
            torch.greater, torch.greater_equal, torch.not_equal):
    _ELEMENTWISE_KIND[_fn] = "compare"
for _fn in (torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not):
    _ELEMENTWISE_KIND[_fn] = "logical"
_ELEMENTWISE_KIND[torch.where] = "where"
_ELEMENTWISE_KIND[torch.masked_fill] = "masked_fill"

_METHOD_KIND: dict[str, str] = {}
for _name in ("add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
              "remainder", "fmod", "neg", "negative", "abs", "minimum", "maximum", "clamp", "clip", "clamp_min",
              "clamp_max", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "sign",
              "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__neg__", "__pos__", "__abs__",
              "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__invert__"):
    _METHOD_KIND[_name] = "arith"
for _name in ("lt", "le", "gt", "ge", "eq", "ne", "less", "less_equal", "greater", "greater_equal", "not_equal",
              "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"):
    _METHOD_KIND[_name] = "compare"
for _name in ("logical_and", "logical_or", "logical_xor", "logical_not"):
    _METHOD_KIND[_name] = "logical"
_METHOD_KIND["masked_fill"] = "masked_fill"

_CAST_METHODS = {"bool": torch.bool, "int": torch.int32, "long": torch.int64, "short": torch.int16,
                 "byte": torch.uint8, "char": torch.int8, "float": torch.float32, "double": torch.float64,
                 "half": torch.float16, "bfloat16": torch.bfloat16}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten"}
_VIEW_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten}
_PERMUTES = {torch.permute: "permute", torch.transpose: "transpose", torch.swapaxes: "transpose",
             torch.swapdims: "transpose", torch.t: "t"}
_FILL_FACTORIES = {torch.ones: 1, torch.zeros: 0, torch.full: None}
_LIKE_FACTORIES = {torch.ones_like: 1, torch.zeros_like: 0, torch.full_like: None}
_NEW_FACTORIES = {"new_ones": 1, "new_zeros": 0, "new_full": None}
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
           "normal", "poisson", "randperm", "dropout", "uniform_", "normal_", "bernoulli_", "random_",
           "exponential_", "cauchy_", "geometric_", "log_normal_", "feature_dropout", "alpha_dropout"}
_UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def _holds_value(x: Any) -> bool:
    if isinstance(x, _Value):
        return True
    if isinstance(x, (tuple, list)):
        return any(_holds_value(y) for y in x)
    if isinstance(x, dict):
        return any(_holds_value(y) for y in x.values())
    return False


# ---------------------------------------------------------------------------------------------------
# the interpreter


class _Lifter:
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], runtime: bool = False) -> None:
        self.gm = gm
        self.runtime = runtime  # lift small runtime values as captures, see Note [Masks read at run time]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(placeholders, example_inputs))
        self.env: dict[fx.Node, Any] = {}
        self.standins: dict[Any, int] = {}  # size symbol -> stand-in, see Note [Symbolic sizes]
        self.captures: list[Capture] = []  # tensors the lifted functions read, with their nodes

    # -- values ------------------------------------------------------------------------------------

    def value(self, node: fx.Node) -> Any:
        if node in self.env:
            return self.env[node]
        ev = _compat.example_value(node)
        if not isinstance(ev, Tensor):
            unbacked = [x for x in _symbols_in(ev) if not _is_backed(x)]
            scalars = [x for x in _symbols_in(ev) if not isinstance(x, torch.SymInt)]
            if unbacked or scalars:
                inputs = _runtime_inputs(node)
                reads = f", reading runtime input {', '.join(inputs)}" if inputs else ""
                kind = "data-dependent" if unbacked else "dynamic"
                raise NotLiftable(f"{kind} value {_sym_str((unbacked or scalars)[0])} ({node.name}{reads})")
        if node.op == "placeholder" and isinstance(ev, _SYM_TYPES):
            self.env[node] = ev  # a size symbol: a token, see Note [Symbolic sizes]
            return ev
        if node.op in ("call_function", "call_method", "get_attr", "placeholder"):
            user = _mutation(node)
            if user is not None:
                raise NotLiftable(f"{node.name} is changed in place by {user.name} ({_op_name(user)})")
        # sizes, dtypes, devices: Dynamo recorded them; the tensors they were read from need not be liftable.
        # Symbolic sizes (s0, s0 // 2) stay SymInts: each use is checked where it happens.
        if node.op in ("call_function", "call_method") and ev is not None and _is_size_like(ev):
            self.env[node] = ev
            return ev
        out = self._compute(node)
        if isinstance(out, _Value) and isinstance(ev, Tensor):
            out = self._check_shape(node, out, ev)
        self.env[node] = out
        return out

    def _check_shape(self, node: fx.Node, out: _Value, ev: Tensor) -> _Value:
        """`out` has the shape and dtype Dynamo recorded (symbolic dims compared through their stand-ins,
        i.e. structurally); records Dynamo's shape in sym_shape."""
        graph_shape = tuple(ev.shape)
        if out.shape != self.probe(graph_shape) or out.dtype != ev.dtype:
            raise NotLiftable(
                f"internal: {node.name} lifted as {out.shape} {out.dtype}, the graph has {graph_shape} {ev.dtype}"
            )
        if not _symbols_in(graph_shape):
            return out
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        for d in graph_shape:
            # a stand-in is "big": the symbol must be so for every size the graph serves
            if isinstance(d, torch.SymInt) and not statically_known_true(d >= 2):
                raise NotLiftable(f"dynamic size {_sym_str(d)} of {node.name} may be 0 or 1")
        return dataclasses.replace(out, sym_shape=graph_shape)

    # -- symbolic sizes, see Note [Symbolic sizes] ---------------------------------------------------------

    def probe(self, x: Any) -> Any:
        """`x` with every SymInt replaced by its value at the stand-ins of its symbols."""
        if isinstance(x, torch.SymInt):
            if not _is_backed(x):
                raise NotLiftable(f"data-dependent size {_sym_str(x)}")
            import sympy

            expr = _compat.sym_expr(x)
            subs = {}
            for sym in sorted(expr.free_symbols, key=str):
                if sym not in self.standins:
                    self.standins[sym] = _standin(len(self.standins))
                subs[sym] = sympy.Integer(self.standins[sym])
            try:
                return int(sympy.sympify(expr.xreplace(subs)))
            except Exception as e:  # noqa: BLE001
                raise NotLiftable(f"dynamic size {expr} cannot be evaluated") from e
        if isinstance(x, (torch.SymFloat, torch.SymBool)):
            raise NotLiftable(f"dynamic value {_sym_str(x)} used as a size")
        if isinstance(x, (tuple, list)):  # torch.Size too
            return tuple(self.probe(y) for y in x) if isinstance(x, tuple) else [self.probe(y) for y in x]
        if isinstance(x, dict):
            return {k: self.probe(v) for k, v in x.items()}
        return x

    def no_symbols(self, node: fx.Node, *values: Any, what: str = "") -> None:
        """Refuse if a size symbol is used as a value: the mask would then change with the size."""
        syms = _symbols_in(values)
        if syms:
            names = ", ".join(dict.fromkeys(_sym_str(x) for x in syms))
            raise NotLiftable(
                f"{node.name} ({_op_name(node)}) computes with the value of dynamic size {names}{what}: "
                "the graph serves every size, and a lifted mask may not depend on one"
            )

    def sizes_of(self, a: Any) -> tuple[Any, ...]:
        """The shape of `a` in Dynamo's terms (ints and SymInts), never stand-ins."""
        if isinstance(a, fx.Node):
            ev = _compat.example_value(a)
            if isinstance(ev, Tensor):
                return tuple(ev.shape)
            a = self.value(a)
        if isinstance(a, _Value):
            if a.sym_shape is not None:
                return a.sym_shape
            if self.standins and any(s >= _standin(0) for s in a.shape):
                raise NotLiftable("the shape of a dynamic-shape tensor was not recorded")
            return a.shape
        if isinstance(a, Tensor):
            return tuple(a.shape)
        raise NotLiftable(f"size of {a!r}")

    def arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.value(a)
        if isinstance(a, (tuple, list)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, slice):
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a

    def meta_of(self, a: Any) -> Any:
        """A meta tensor with the shape and dtype of `a`, read from the graph without lifting `a`."""
        if isinstance(a, fx.Node):
            ev = _compat.example_value(a)
            if isinstance(ev, Tensor):
                return torch.empty(self.probe(tuple(ev.shape)), dtype=ev.dtype, device="meta")
            a = self.value(a)
        return a.meta() if isinstance(a, _Value) else a

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            obj = _fetch_attr(self.gm, node.target)
            return _captured(obj, node, self.captures) if isinstance(obj, Tensor) else obj
        if node.op not in ("call_function", "call_method"):
            raise NotLiftable(f"{node.name} is a {node.op} node")
        t = node.target
        if node.op == "call_function":
            name = getattr(t, "__name__", "")
            if t in _ELEMENTWISE_KIND:
                if t is torch.where and len(node.args) + len(node.kwargs) == 1:
                    raise NotLiftable(f"torch.where with one argument is data-dependent ({node.name})")
                return self._elementwise(node, t, _ELEMENTWISE_KIND[t])
            if t is operator.getitem:
                return self._getitem(node)
            if t is torch.arange:
                return self._arange(node)
            if t in (torch.tril, torch.triu):
                return self._tri(node, t is torch.tril)
            if t in _FILL_FACTORIES:
                return self._fill(node, t, _FILL_FACTORIES[t])
            if t in _LIKE_FACTORIES:
                return self._fill_like(node, t, _LIKE_FACTORIES[t])
            if t in (torch.tensor, torch.as_tensor, torch.scalar_tensor):
                return self._tensor_literal(node)
            if t in _VIEW_FUNCTIONS:
                return self._view(node, lambda x, *a, **k: t(x, *a, **k))
            if t in _PERMUTES:
                return self._permute(node, _PERMUTES[t])
            if t is torch.broadcast_to:
                return self._expand(node, self.arg(node.args[1]))
            if t is torch.clone:
                return self._identity(node)
            if t is getattr:
                return self._getattr(node)
            return self._unsupported(node, name)
        # call_method
        if t in _METHOD_KIND:
            return self._elementwise(node, t, _METHOD_KIND[t])
        if t == "where":  # x.where(cond, y) is torch.where(cond, x, y)
            return self._elementwise(node, torch.where, "where", reorder=(1, 0, 2))
        if t in ("tril", "triu"):
            return self._tri(node, t == "tril")
        if t in _CAST_METHODS or t in ("to", "type", "type_as"):
            return self._cast(node)
        if t in _IDENTITY_METHODS:
            return self._identity(node)
        if t in _VIEW_METHODS:
            return self._view(node, lambda x, *a, **k: getattr(x, t)(*a, **k))
        if t in ("permute", "transpose", "swapaxes", "swapdims", "t"):
            return self._permute(node, "transpose" if t in ("swapaxes", "swapdims") else t)
        if t == "expand":
            sizes = self.arg(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = sizes[0]
            return self._expand(node, sizes)
        if t == "expand_as":
            return self._expand(node, tuple(self.meta_of(node.args[1]).shape))
        if t in _NEW_FACTORIES:
            return self._fill_new(node, _NEW_FACTORIES[t])
        if t in ("size", "dim", "numel"):
            return self._size_query(node.args[0], t, self.arg(node.args[1:]))
        return self._unsupported(node, t)

    def _getattr(self, node: fx.Node) -> Any:
        obj, attr = node.args[0], node.args[1]
        if attr in ("shape", "ndim"):
            return self._size_query(obj, "size" if attr == "shape" else "dim", ())
        if attr in ("dtype", "device", "is_cuda", "requires_grad", "layout"):
            return getattr(self.meta_of(obj), attr)
        src = self.arg(obj)
        if not isinstance(src, _Value):
            return getattr(src, attr)
        n = len(src.shape)
        if attr in ("T", "mT") and n >= 2:
            perm = list(range(n))[::-1] if attr == "T" else [*range(n - 2), n - 1, n - 2]
            routes: list[tuple[int | None, int, int]] = [(None, 0, 0)] * n
            for k, d in enumerate(perm):
                routes[d] = (k, 0, 1)
            return _reindex(src, tuple(src.shape[d] for d in perm), routes)
        raise NotLiftable(f"{node.name}: attribute Tensor.{attr}")

    def _size_query(self, obj: Any, what: str, args: Sequence[Any]) -> Any:
        shape = self.sizes_of(obj)
        if what == "dim":
            return len(shape)
        if what == "numel":
            n: Any = 1
            for d in shape:
                n = n * d
            return n
        if args:
            return shape[args[0]]
        try:
            return torch.Size(shape)
        except Exception:  # noqa: BLE001
            return shape

    def _unsupported(self, node: fx.Node, name: str) -> Any:
        if name in _RANDOM or getattr(node.target, "_nondeterministic_seeded", False):
            raise NotLiftable(f"random op {_op_name(node)} ({node.name})")
        if name in _UNINITIALISED:
            raise NotLiftable(f"op {_op_name(node)} reads uninitialised memory ({node.name})")
        small = self._small_constant(node, runtime=self.runtime and bool(_runtime_inputs(node, values_only=True)))
        if small is not None:
            return small
        inputs = _runtime_inputs(node)
        reads = f", reading runtime input {', '.join(inputs)}" if inputs else ""
        raise NotLiftable(f"op {_op_name(node)} is not index arithmetic ({node.name}{reads})")

    def _small_constant(self, node: fx.Node, runtime: bool = False) -> _Value | None:
        """Note [Small constants]: a small tensor computed from shapes and buffers only (HF's
        packed_sequence_mask = cumsum(diff(position_ids) != 1) with position_ids = arange(L)) is evaluated
        once here and read by index, like a buffer; its node is passed to Flex at run time (a Capture).
        runtime=True: the same for a small value computed from runtime inputs, evaluated on the example
        inputs and marked as read at run time (Note [Masks read at run time])."""
        ev = _compat.example_value(node)
        if not _is_small(ev) or (sum(1 for d in ev.shape if d > 1) > 1 and not runtime):
            return None  # not a per-token vector: an L x S tensor is never made at compile time
        if self.standins or (_runtime_inputs(node, values_only=True) and not runtime):
            return None
        anc = ancestors(node)
        env: dict[fx.Node, Any] = {}
        interp = fx.Interpreter(self.gm)
        for n in self.gm.graph.nodes:
            if n not in anc:
                continue
            if n.op == "placeholder":
                env[n] = self.inputs.get(n)
                if env[n] is None or _is_fake(env[n]):
                    return None
                continue
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            try:
                env[n] = getattr(interp, n.op)(n.target, args, kwargs)
            except Exception:  # noqa: BLE001 - not evaluable here: the caller says why it is not liftable
                log.debug("small constant %s: %s not evaluated", node.name, n.name, exc_info=True)
                return None
        value = env[node]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(ev.shape):
            return None
        return _captured(value, node, self.captures, runtime=runtime)

    def _placeholder(self, node: fx.Node) -> Any:
        x = self.inputs.get(node)
        ev = _compat.example_value(node)
        if not isinstance(ev, Tensor) and not isinstance(x, Tensor):
            unbacked = [y for y in _symbols_in(x) if not _is_backed(y)]
            if unbacked:
                raise NotLiftable(f"data-dependent value {_sym_str(unbacked[0])} ({node.name})")
            return x  # a size symbol stays a token, see Note [Symbolic sizes]
        kind = _placeholder_kind(node)
        if kind == "buffer":
            if not isinstance(x, Tensor) or _is_fake(x):
                raise NotLiftable(f"the value of buffer {node.name} is not available")
            return _captured(x, node, self.captures)
        if kind == "parameter":
            raise NotLiftable(f"reads the values of parameter {node.name}")
        if self.runtime and isinstance(x, Tensor) and not _is_fake(x) and isinstance(ev, Tensor):
            if _is_small(ev):
                return _captured(x, node, self.captures, runtime=True)  # Note [Masks read at run time]
            raise NotLiftable(f"runtime input {node.name} {tuple(ev.shape)} is too big or dynamic to read at run time")
        raise NotLiftable(f"reads the values of runtime input {node.name}")

    # -- elementwise ---------------------------------------------------------------------------------

    def _elementwise(self, node: fx.Node, target: Any, kind: str, reorder: tuple[int, ...] | None = None) -> Any:
        args = list(self.arg(node.args))
        kwargs = dict(self.arg(node.kwargs))
        if reorder is not None:
            args = [args[i] for i in reorder if i < len(args)]
        if "out" in kwargs:
            raise NotLiftable(f"{node.name} writes into out=")
        for a in [*args, *kwargs.values()]:
            if isinstance(a, (tuple, list)) and any(isinstance(x, _Value) for x in a):
                raise NotLiftable(f"{node.name} ({_op_name(node)}) takes a list of tensors")
        if isinstance(target, str):
            name = target

            def call(*a: Any, **k: Any) -> Any:
                return getattr(a[0], name)(*a[1:], **k)
        else:
            call = target
        if not any(isinstance(a, _Value) for a in [*args, *kwargs.values()]):
            out = call(*args, **kwargs)  # python numbers only (size arithmetic)
            return _captured(out, node, self.captures) if isinstance(out, Tensor) else out
        self.no_symbols(node, args, kwargs)

        meta_args = [a.meta() if isinstance(a, _Value) else a for a in args]
        meta_kwargs = {k: v.meta() if isinstance(v, _Value) else v for k, v in kwargs.items()}
        try:
            out = call(*meta_args, **meta_kwargs)
        except Exception as e:  # noqa: BLE001 - an op the meta device rejects is one we do not understand
            raise NotLiftable(f"{node.name} ({_op_name(node)}): {e}") from e
        if not isinstance(out, Tensor):
            raise NotLiftable(f"{node.name} ({_op_name(node)}) does not give a tensor")
        shape, dtype = tuple(out.shape), out.dtype

        # the dtype each operand is computed in, see Note [Lifted values]
        cast: dict[int | str, torch.dtype] = {}
        if kind == "compare" and len(meta_args) == 2 and not kwargs:
            ct = torch.result_type(meta_args[0], meta_args[1])
            cast = {0: ct, 1: ct}
        elif kind == "arith":
            cast = {i: dtype for i in range(len(args))}
            cast.update({k: dtype for k in kwargs})
        elif kind == "where":
            cast = {1: dtype, 2: dtype}
        elif kind == "masked_fill":
            cast = {0: dtype}

        n = len(shape)

        def slot(a: Any, key: int | str) -> tuple[Any, ...]:
            if not isinstance(a, _Value):
                return ("c", a, 0, None)
            ct = cast.get(key)
            return ("v", a.fn, n - len(a.shape), ct if ct is not None and ct != a.dtype else None)

        arg_slots = [slot(a, i) for i, a in enumerate(args)]
        kw_slots = {k: slot(v, k) for k, v in kwargs.items()}
        deps = frozenset(
            d + n - len(a.shape) for a in [*args, *kwargs.values()] if isinstance(a, _Value) for d in a.deps
        )

        def get(s: tuple[Any, ...], idx: _Index, ref: Tensor) -> Any:
            tag, x, off, ct = s
            if tag == "c":
                return x
            v = x(idx[off:], ref)
            return v.to(ct) if ct is not None else v

        def elementwise(idx: _Index, ref: Tensor) -> Tensor:
            a = [get(s, idx, ref) for s in arg_slots]
            k = {key: get(s, idx, ref) for key, s in kw_slots.items()}
            return call(*a, **k)

        return _Value(shape, dtype, deps, elementwise)

    # -- sources ---------------------------------------------------------------------------------------

    def _arange(self, node: fx.Node) -> _Value:
        args = self.arg(node.args)
        kwargs = self.arg(node.kwargs)
        if any(isinstance(a, _Value) for a in [*args, *kwargs.values()]):
            raise NotLiftable(f"{node.name}: arange with tensor bounds")
        if len(args) == 1:
            start, step = kwargs.get("start", 0), kwargs.get("step", 1)
        else:
            start = args[0] if args else kwargs.get("start", 0)
            step = args[2] if len(args) > 2 else kwargs.get("step", 1)
        # element i is start + step * i whatever the end: only the end may be symbolic
        self.no_symbols(node, start, step, what=" (as the start or step of arange)")
        meta = torch.arange(*self.probe(args), **{**self.probe(kwargs), "device": "meta"})
        if meta.dtype.is_floating_point or meta.dtype.is_complex:
            raise NotLiftable(f"{node.name}: floating-point arange (its rounding is not reproduced)")
        dtype, size = meta.dtype, meta.shape[0]
        start, step = int(start), int(step)
        if size == 1:
            return _const((1,), dtype, start)

        def arange(idx: _Index, ref: Tensor) -> Tensor:
            i = idx[0]
            if not isinstance(i, Tensor):
                return torch.full((), start + step * i, dtype=dtype, device=ref.device)
            i = i.to(dtype)
            if step != 1:
                i = i * step
            return i + start if start else i

        return _Value((size,), dtype, frozenset({0}), arange)

    def _fill(self, node: fx.Node, target: Any, value: Any) -> _Value:
        args, kwargs = self.arg(node.args), self.arg(node.kwargs)
        if target is torch.full:
            value = args[1] if len(args) > 1 else kwargs.get("fill_value")
        self.no_symbols(node, value, what=" (as a fill value)")
        return self._factory_const(
            node, lambda: target(*self.probe(args), **{**self.probe(kwargs), "device": "meta"}), value)

    def _fill_like(self, node: fx.Node, target: Any, value: Any) -> _Value:
        x = self.meta_of(node.args[0])
        args, kwargs = self.arg(node.args[1:]), self.arg(node.kwargs)
        if target is torch.full_like:
            value = args[0] if args else kwargs.get("fill_value")
        self.no_symbols(node, value, what=" (as a fill value)")
        return self._factory_const(
            node, lambda: target(x, *self.probe(args), **{**self.probe(kwargs), "device": "meta"}), value)

    def _fill_new(self, node: fx.Node, value: Any) -> _Value:
        x = self.meta_of(node.args[0])
        args, kwargs = self.arg(node.args[1:]), self.arg(node.kwargs)
        if node.target == "new_full":
            value = args[1] if len(args) > 1 else kwargs.get("fill_value")
        self.no_symbols(node, value, what=" (as a fill value)")
        return self._factory_const(
            node, lambda: getattr(x, node.target)(*self.probe(args), **{**self.probe(kwargs), "device": "meta"}), value)

    def _factory_const(self, node: fx.Node, make_meta: Callable[[], Tensor], value: Any) -> _Value:
        if isinstance(value, _Value) or not isinstance(value, (bool, int, float)):
            raise NotLiftable(f"{node.name}: fill value {value!r} is not a number")
        meta = make_meta()
        return _const(tuple(meta.shape), meta.dtype, value)

    def _tensor_literal(self, node: fx.Node) -> _Value:
        args, kwargs = self.arg(node.args), self.arg(node.kwargs)
        if _holds_value((args, kwargs)):
            raise NotLiftable(f"{node.name}: tensor() of lifted values")
        self.no_symbols(node, args, kwargs)
        t = node.target(*args, **kwargs)
        if t.dim() == 0:
            return _const((), t.dtype, t.item())
        return _captured(t, node, self.captures)

    # -- views -----------------------------------------------------------------------------------------

    def _identity(self, node: fx.Node) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value):
            raise NotLiftable(f"{node.name}: not a tensor")
        return src

    def _cast(self, node: fx.Node) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value):
            raise NotLiftable(f"{node.name}: cast of a non-tensor")
        ev = _compat.example_value(node)
        if isinstance(ev, Tensor):
            dtype = ev.dtype
        elif node.target in _CAST_METHODS:
            dtype = _CAST_METHODS[node.target]
        else:
            dtype = src.dtype
            for a in [*node.args[1:], *node.kwargs.values()]:
                if isinstance(a, torch.dtype):
                    dtype = a
                elif isinstance(a, fx.Node) and isinstance(_compat.example_value(a), Tensor):
                    dtype = _compat.example_value(a).dtype
        if dtype == src.dtype:
            return src
        src_fn = src.fn

        def cast(idx: _Index, ref: Tensor) -> Tensor:
            return src_fn(idx, ref).to(dtype)

        return _Value(src.shape, dtype, src.deps, cast)

    def _view(self, node: fx.Node, op: Callable[..., Tensor]) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value):
            raise NotLiftable(f"{node.name}: view of a non-tensor")
        args, kwargs = self.arg(node.args[1:]), self.arg(node.kwargs)
        try:
            meta = op(src.meta(), *self.probe(args), **self.probe(kwargs))  # sizes: see Note [Symbolic sizes]
        except NotLiftable:
            raise
        except Exception as e:  # noqa: BLE001
            raise NotLiftable(f"{node.name} ({_op_name(node)}): {e}") from e
        if meta.dtype != src.dtype:
            raise NotLiftable(f"{node.name} reinterprets the bits of a tensor")
        shape = tuple(meta.shape)
        src_big = [d for d, s in enumerate(src.shape) if s != 1]
        out_big = [k for k, s in enumerate(shape) if s != 1]
        if [src.shape[d] for d in src_big] != [shape[k] for k in out_big]:
            raise NotLiftable(f"{node.name} ({_op_name(node)}) merges or splits dims: {src.shape} -> {shape}")
        routes: list[tuple[int | None, int, int]] = [(None, 0, 0)] * len(src.shape)
        for d, k in zip(src_big, out_big):
            routes[d] = (k, 0, 1)
        return _reindex(src, shape, routes)

    def _permute(self, node: fx.Node, kind: str) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value):
            raise NotLiftable(f"{node.name}: permute of a non-tensor")
        n = len(src.shape)
        args = self.arg(node.args[1:])
        kwargs = self.arg(node.kwargs)
        self.no_symbols(node, args, kwargs, what=" (as a dim)")
        perm = list(range(n))
        if kind == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args or kwargs.get("dims")
            perm = [int(d) % n for d in dims]
        elif kind == "t":
            if n == 2:
                perm = [1, 0]
        else:
            d0 = args[0] if args else kwargs.get("dim0")
            d1 = args[1] if len(args) > 1 else kwargs.get("dim1")
            d0, d1 = int(d0) % n, int(d1) % n
            perm[d0], perm[d1] = perm[d1], perm[d0]
        shape = tuple(src.shape[d] for d in perm)
        routes: list[tuple[int | None, int, int]] = [(None, 0, 0)] * n
        for k, d in enumerate(perm):
            routes[d] = (k, 0, 1)
        return _reindex(src, shape, routes)

    def _expand(self, node: fx.Node, sizes: Sequence[Any]) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value):
            raise NotLiftable(f"{node.name}: expand of a non-tensor")
        sizes = [int(s) for s in self.probe(list(sizes))]  # see Note [Symbolic sizes]
        n, m = len(sizes), len(src.shape)
        if n < m:
            raise NotLiftable(f"{node.name}: expand to fewer dims")
        shape = []
        for k, s in enumerate(sizes):
            d = k - (n - m)
            if d < 0:
                if s < 0:
                    raise NotLiftable(f"{node.name}: expand with -1 in a new dim")
                shape.append(s)
            elif s == -1 or s == src.shape[d]:
                shape.append(src.shape[d])
            elif src.shape[d] == 1:
                shape.append(s)
            else:
                raise NotLiftable(f"{node.name}: cannot expand {src.shape} to {tuple(sizes)}")
        routes = [(d + n - m, 0, 1) for d in range(m)]
        return _reindex(src, shape, routes)

    def _gather(self, node: fx.Node, src: _Value, items: list[_Value]) -> _Value:
        """src[i0, i1, ...] with one lifted integer index per dim of src (HF's packed_sequence_mask[b, q]):
        the value at an index is src's value at the indices' values there. Exact, including negative
        indices (both wrap the same way); an index out of range fails at run time as it did."""
        if len(items) != len(src.shape):
            raise NotLiftable(f"{node.name}: indexing {len(items)} of {len(src.shape)} dims with tensors")
        if any(it.dtype.is_floating_point or it.dtype == torch.bool for it in items):
            raise NotLiftable(f"{node.name}: index tensors must be integers")
        ev = _compat.example_value(node)
        try:
            shape = tuple(torch.broadcast_shapes(*(it.shape for it in items)))
        except RuntimeError as e:
            raise NotLiftable(f"{node.name}: index shapes do not broadcast ({e})") from e
        if not isinstance(ev, Tensor) or tuple(self.probe(tuple(ev.shape))) != shape:
            raise NotLiftable(f"{node.name}: an indexing result of another shape than its indices'")
        n = len(shape)
        offsets = [(it.fn, n - len(it.shape)) for it in items]
        deps = frozenset(d + n - len(it.shape) for it in items for d in it.deps)
        src_fn = src.fn

        def gather(idx: _Index, ref: Tensor) -> Tensor:
            return src_fn(tuple(fn(idx[off:], ref) for fn, off in offsets), ref)

        return _Value(shape, src.dtype, deps, gather)

    def _getitem(self, node: fx.Node) -> Any:
        src = self.arg(node.args[0])
        index = self.arg(node.args[1])
        if not isinstance(src, _Value):
            return src[index]  # sizes, tuples
        items = list(index) if isinstance(index, tuple) else [index]
        if items and all(isinstance(it, _Value) for it in items):
            return self._gather(node, src, items)
        for it in items:
            if isinstance(it, (_Value, Tensor)) or isinstance(it, bool) or isinstance(it, (list, tuple)):
                raise NotLiftable(f"{node.name}: indexing with a tensor or a list (data-dependent gather)")
            if not (it is None or it is Ellipsis or isinstance(it, (int, slice))):
                raise NotLiftable(f"{node.name}: index {it!r}")
        consuming = sum(1 for it in items if isinstance(it, (int, slice)))
        m = len(src.shape)
        if consuming > m or items.count(Ellipsis) > 1:
            raise NotLiftable(f"{node.name}: too many indices")
        if Ellipsis in items:
            e = items.index(Ellipsis)
            items[e:e + 1] = [slice(None)] * (m - consuming)
        else:
            items += [slice(None)] * (m - consuming)
        # Dynamic shapes: which source dims have symbolic sizes, and the output shape Dynamo recorded
        sym_dims = {i for i, x in enumerate(src.sym_shape or ()) if isinstance(x, torch.SymInt)}
        ev = _compat.example_value(node)
        routes: list[tuple[int | None, int, int]] = []
        shape: list[int] = []
        d = 0
        for it in items:
            if it is None:
                shape.append(1)
                continue
            size = src.shape[d]
            if isinstance(it, torch.SymInt) or (isinstance(it, slice) and _symbols_in((it.start, it.step))):
                self.no_symbols(node, it, what=" (as an index or a slice start or step)")
            if isinstance(it, int):
                if not -size <= it < size:
                    raise NotLiftable(f"{node.name}: index {it} out of range for size {size}")
                if it < 0 and d in sym_dims:
                    raise NotLiftable(f"{node.name}: index {it} counts from the end of a dynamic size")
                routes.append((None, it % size, 0))
            elif isinstance(it.stop, torch.SymInt):
                # x[a:stop:c][i] is x[a + c * i] for every stop: the value does not depend on it, only
                # the shape does, and Dynamo recorded that (stop clipped to the size under its guards).
                start = 0 if it.start is None else it.start
                step = 1 if it.step is None else it.step
                if not (isinstance(start, int) and start >= 0 and isinstance(step, int) and step >= 1):
                    raise NotLiftable(f"{node.name}: slice {it!r} with a dynamic stop and start {start}, step {step}")
                if not isinstance(ev, Tensor) or len(ev.shape) != len([x for x in items if not isinstance(x, int)]):
                    raise NotLiftable(f"{node.name}: slice with a dynamic stop and no recorded shape")
                routes.append((len(shape), start, step))
                shape.append(self.probe(ev.shape[len(shape)]))
            else:
                if not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in (it.start, it.stop, it.step)):
                    raise NotLiftable(f"{node.name}: slice {it!r} with non-integer bounds")
                if d in sym_dims and it.start is not None and it.start < 0:
                    raise NotLiftable(f"{node.name}: slice {it!r} starts from the end of a dynamic size")
                start, stop, step = it.indices(size)
                if step <= 0:
                    raise NotLiftable(f"{node.name}: slice step {step}")
                routes.append((len(shape), start, step))
                shape.append(len(range(start, stop, step)))
            d += 1
        return _reindex(src, shape, routes)

    def _tri(self, node: fx.Node, lower: bool) -> _Value:
        src = self.arg(node.args[0])
        if not isinstance(src, _Value) or len(src.shape) < 2:
            raise NotLiftable(f"{node.name}: tril/triu of a non-matrix")
        diag = self.arg(node.args[1]) if len(node.args) > 1 else self.arg(node.kwargs.get("diagonal", 0))
        self.no_symbols(node, diag, what=" (as the diagonal)")
        if not isinstance(diag, int):
            raise NotLiftable(f"{node.name}: diagonal {diag!r} is not an int")
        n = len(src.shape)
        rows, cols = n - 2, n - 1
        big_r, big_c = src.shape[rows] > 1, src.shape[cols] > 1
        src_fn, dtype = src.fn, src.dtype

        def tri(idx: _Index, ref: Tensor) -> Tensor:
            r = idx[rows] if big_r else 0
            c = idx[cols] if big_c else 0
            keep = (c - r <= diag) if lower else (c - r >= diag)
            if not isinstance(keep, Tensor):
                keep = torch.full((), bool(keep), device=ref.device)
            zero = torch.zeros((), dtype=dtype, device=ref.device)
            return torch.where(keep, src_fn(idx, ref), zero)

        deps = src.deps | {d for d, big in ((rows, big_r), (cols, big_c)) if big}
        return _Value(src.shape, dtype, frozenset(deps), tri)


def _is_fake(x: Tensor) -> bool:
    return _compat.is_fake(x)


# ---------------------------------------------------------------------------------------------------
# public API


def lift(nodes: list[fx.Node], gm: fx.GraphModule, example_inputs: Sequence[Any], runtime: bool = False) -> list[Lifted]:
    """Lift each node (a tensor that broadcasts to the scores from the right) into an index function.

    runtime=True also lifts small values read from runtime inputs, as captures marked `runtime` (Note
    [Masks read at run time]); a block mask for such functions must be built in the graph.

    Raises NotLiftable, with a reason for users, if any ancestor is not index arithmetic on shapes,
    constants and buffers. Never mutates the graph, and adds no guard to a dynamic-shape graph.
    Under dynamic shapes the functions are right for every value of the size symbols (a use of a
    symbol's value raises NotLiftable), and Lifted.shape may hold SymInts.
    """
    lifter = _Lifter(gm, example_inputs, runtime)
    out = []
    for node in nodes:
        try:
            value = lifter.value(node)
        except RecursionError:
            raise NotLiftable(f"the subgraph of {node.name} is too deep to lift") from None
        if not isinstance(value, _Value):
            raise NotLiftable(f"{node.name} is not a tensor")
        n = len(value.shape)
        if n > 4 and any(s != 1 for s in value.shape[: n - 4]):
            raise NotLiftable(f"{node.name} has more than 4 dims: {value.shape}")
        fn = _index_function(value)
        axes = frozenset(AXES[4 - n + d] for d in value.deps)
        fn.__name__ = fn.__qualname__ = _name_lifted(fn, value, axes)
        log.debug("lifted %s as %s, axes %s", node.name, fn.__name__, sorted(axes))
        shape = value.sym_shape if value.sym_shape is not None else value.shape
        out.append(Lifted(fn, axes, shape, value.dtype, tuple(lifter.captures)))
    return out


def _index_function(value: _Value) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    n = len(value.shape)
    value_fn = value.fn
    pad = (0,) * max(0, n - 4)

    # FlexAttention tells a mask_mod from a score_mod by its 4 positional parameters: keep them plain.
    def lifted_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        idx = (b, h, q_idx, kv_idx)
        return value_fn(pad + idx[max(0, 4 - n):], q_idx)

    return lifted_mask


def _name_lifted(fn: Callable[..., Tensor], value: _Value, axes: frozenset[str]) -> str:
    if "b" in axes or "h" in axes or len(value.shape) < 2:
        return "lifted_mask"
    # under dynamic shapes, named at the example's sizes (a name is never a proof)
    L, S = _hint_shape(value.sym_shape if value.sym_shape is not None else value.shape)[-2:]
    if value.dtype == torch.bool:
        return name_mask(fn, L, S)
    # an additive mask: 0 where kept, a large negative where removed
    q, kv = sample_grid(L, S)
    zero = torch.zeros((), dtype=torch.int64)
    try:
        v = fn(zero, zero, q, kv).double()
        if not bool(((v == 0) | (v <= _REMOVED)).all()):
            return "lifted_mask"
    except Exception:  # noqa: BLE001 - a name is not worth an error
        return "lifted_mask"
    return name_mask(lambda b, h, q_idx, kv_idx: fn(b, h, q_idx, kv_idx) == 0, L, S)
