"""Every private torch API asam_compile touches, in one place. Checked on torch 2.11 (CUDA) and 2.13 (CPU)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph (node meta copied shallowly) sharing gm's attributes."""
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old_node, new_node in val_map.items():
        # AOTAutograd reads Dynamo's source of each graph input from this attribute
        if old_node.op == "placeholder" and hasattr(old_node, "_dynamo_source"):
            new_node._dynamo_source = old_node._dynamo_source
    # graph_copy drops the output node's meta; Dynamo/Inductor do not need it.
    graph._codegen = gm.graph._codegen
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _cache_marker(cache_key: str, existing: Any):
    """A do-nothing joint-graph pass whose uuid() puts our version and options into Inductor's cache key.

    See Note [FX graph cache] in asam_compile/backend.py. A user's own joint_custom_pre_pass still runs.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class AsamCacheMarker(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            if existing is not None:
                existing(graph)

        def uuid(self) -> Any:
            inner = existing.uuid() if existing is not None and hasattr(existing, "uuid") else None
            return ("asam_compile", cache_key, inner)

    return AsamCacheMarker()


def compile_fx(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    cache_key: str = "",
    use_cache: bool = True,
    flex_on_cpu: bool = False,
):
    """Inductor's entry point, as torch.compile(backend="inductor") calls it, with our cache marker.

    use_cache=False keeps this compile out of Inductor's FX graph cache (neither read nor written).
    flex_on_cpu=True turns off epilogue fusion into templates: Inductor's CPU scheduler fuses pointwise
    ops into its FlexAttention template, whose render then raises "Unsupported for `epilogue_nodes` in
    CppFlexAttentionTemplate" (torch 2.13). On CPU the default matmuls are not templates, so little is lost.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    config_patches: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        config_patches.update(list_mode_options(mode))
    config_patches["joint_custom_pre_pass"] = _cache_marker(cache_key, inductor_config.joint_custom_pre_pass)
    if not use_cache:
        config_patches["fx_graph_cache"] = False
    if flex_on_cpu:
        config_patches["epilogue_fusion"] = False
    return _compile_fx(gm, list(example_inputs), config_patches=config_patches)


def example_value(node: fx.Node) -> Any:
    """The fake value Dynamo recorded for a node (FakeTensor, SymInt, python value), or None."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    return meta.get("val")


def fake_mode_from(values: Any):
    """The FakeTensorMode of the first fake tensor among `values` (nested), or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    for v in torch.utils._pytree.tree_leaves(values):
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def symbol_hint(shape_env: Any, symbol: Any) -> int | None:
    """The example value of a size symbol (torch 2.13 renamed var_to_val to backed_var_to_val)."""
    table = getattr(shape_env, "backed_var_to_val", None)
    if table is None:
        table = shape_env.var_to_val
    val = table.get(symbol)
    return None if val is None else int(val)


def placeholder_source(node: fx.Node) -> str | None:
    """Dynamo's source name of a graph input, e.g. "L['self']._modules['attn']._buffers['bias']"."""
    # meta["grapharg"] exists while the backend runs; Dynamo's clean-up deletes it later but leaves
    # node._dynamo_source (which AOTAutograd reads too).
    arg = node.meta.get("grapharg")
    source = arg.source if arg is not None else getattr(node, "_dynamo_source", None)
    if source is None:
        return None
    try:
        return source.name() if callable(source.name) else source.name
    except Exception:  # noqa: BLE001
        return None


def is_fake(x: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def sym_hint(x: Any) -> int | float | None:
    """The example value behind a SymInt/SymFloat (None for an unbacked, data-dependent one)."""
    return x.node.hint


def sym_expr(x: Any) -> Any:
    """The sympy expression of a SymInt."""
    return x.node.expr


def sym_shape_env(x: Any) -> Any:
    return x.node.shape_env


def is_buffer(node: fx.Node) -> bool:
    """Whether a placeholder is a module buffer (not a parameter) that Dynamo lifted into a graph input."""
    return "._buffers[" in (placeholder_source(node) or "")


def is_param_or_buffer(node: fx.Node) -> bool:
    """Whether a placeholder is a module parameter or buffer that Dynamo lifted into a graph input."""
    name = placeholder_source(node) or ""
    return "._buffers[" in name or "._parameters[" in name


def _sfdp_entries(patterns) -> list[tuple[Any, Any]]:
    """(key, entry) pairs of Inductor's fuse_attention patterns, recognised by their extra_check."""
    found = []
    for key, entries in patterns.patterns.items():
        for entry in entries:
            if str(getattr(entry, "pattern_name", "") or "").startswith("_sfdp") or _from_fuse_attention(
                getattr(entry, "extra_check", None)
            ):
                found.append((key, entry))
    return found


_FUSE_ATTENTION = "torch._inductor.fx_passes.fuse_attention"


def _from_fuse_attention(fn: Any, depth: int = 0) -> bool:
    """Whether a pattern's check function is, or closes over, a function of fuse_attention.py.

    torch 2.13 names its entries (`pattern_name="_sfdp_..."`); torch 2.11 does not, but its
    register_replacement check_fn closes over fuse_attention's own extra_check (measured on both).
    """
    if fn is None or depth > 2:
        return False
    if getattr(fn, "__module__", None) == _FUSE_ATTENTION:
        return True
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value) and _from_fuse_attention(value, depth + 1):
            return True
    return False


@contextlib.contextmanager
def inductor_sfdp_disabled(enabled: bool = True, devices: Sequence[Any] = ()) -> Iterator[int]:
    """Remove Inductor's attention patterns (fuse_attention.py) from its joint-graph pass while compiling.

    See Note [Inductor's attention pass] in asam_compile/backend.py. Yields how many patterns were removed.
    """
    if not enabled:
        yield 0
        return
    from torch._inductor.fx_passes import joint_graph

    # The patterns are registered lazily, once per input device (lazy_init is cached on it).
    joint_graph.lazy_init()
    for device in devices:
        joint_graph.lazy_init(device)
    removed = []
    for pass_ in _pattern_passes():
        for key, entry in _sfdp_entries(pass_):
            pass_.patterns[key].remove(entry)
            removed.append((pass_, key, entry))
    try:
        yield len(removed)
    finally:
        for pass_, key, entry in removed:
            pass_.patterns[key].append(entry)


def _pattern_passes() -> list[Any]:
    """Every PatternMatcherPass of Inductor's joint-graph and post-grad passes (where sfdp may live)."""
    from torch._inductor.fx_passes import joint_graph, post_grad
    from torch._inductor.pattern_matcher import PatternMatcherPass

    found: list[Any] = []
    for module in (joint_graph, post_grad):
        for value in vars(module).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, PatternMatcherPass) and all(item is not f for f in found):
                    found.append(item)
    return found


@contextlib.contextmanager
def inductor_pattern_matcher_off() -> Iterator[None]:
    from torch._inductor import config as inductor_config

    with inductor_config.patch(pattern_matcher=False):
        yield


def fuse_attention_count() -> int:
    """How many times Inductor's own attention patterns have fired in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fuse_attention"])


def compiled_frame_module() -> Any:
    """The nn.Module whose method Dynamo is compiling right now (the frame's `self`), or None.

    Dynamo's nn_module_stack records the modules called from the compiled frame, never the frame's own
    module: `torch.compile(module)` compiles module.forward, whose `self` is only in the frame's locals.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        if code.co_argcount < 1:
            return None
        first = tx.f_locals.get(code.co_varnames[0])
    except Exception:  # noqa: BLE001 - not inside Dynamo, or another torch: no root module known
        return None
    return first if isinstance(first, torch.nn.Module) else None


def outside_dispatch_modes():
    """A context in which the active TorchDispatchModes do not see the ops run (checked on torch 2.11, 2.13).

    The runtime of a compiled graph runs the graph's first call under AOTAutograd's custom-op aliasing check
    (_AnalyzeCustomOpInputOutputMode); inside our opaque op that mode breaks the vmap that
    BlockMask.from_kv_blocks uses ("Cannot access storage of BatchedTensorImpl"). The op's body is ordinary
    eager code that owes no mode a view of its internals.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def more_recompiles(limit: int = 64):
    """A context in which Dynamo compiles a function for up to `limit` different guards before it falls back to
    running it uncompiled (torch._dynamo.config.recompile_limit, 8 by default; cache_size_limit before torch 2.6;
    checked on torch 2.11, 2.13). For the compiled helpers that the adaptive ops call eagerly: a measured
    dispatch gathers a different number of heads per site, and torch.compile(flex_attention) specialises the
    head count even with dynamic=True (Note [Dispatch by measured density])."""
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(limit, getattr(config, name))})


def autograd_inside_op():
    """A context in which autograd records again, inside a custom op's implementation (checked on torch 2.11,
    2.13). The dispatcher runs a custom op's kernel with the autograd keys excluded; the backward op of
    asam::adaptive_attention recomputes its forward and differentiates it, which needs them back."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def static_closures():
    """A context in which Dynamo specialises Python ints and floats. FlexAttention traces mask_mod/score_mod
    with a nested Dynamo; under `torch.compile(dynamic=True)` that trace turned our functions' closure
    constants (window sizes, fill values) into graph inputs, and Inductor's FakeTensorUpdater then failed on
    them ("A subgraph argument other than striding has been modified", torch 2.13): Note [Flex under dynamic
    shapes] in passes/match.py. Tensor sizes stay symbolic: they come from the traced tensors."""
    import torch._dynamo.config as dynamo_config

    wanted = {"assume_static_by_default": True, "specialize_float": True}
    return dynamo_config.patch(**{k: v for k, v in wanted.items() if hasattr(dynamo_config, k)})


def register_torch_log(name: str) -> None:
    """Make TORCH_LOGS="+<name>" reach the `name` logger (torch._logging's registry: private, 2.11 and 2.13)."""
    from torch._logging._internal import log_registry, register_log

    if name not in log_registry.log_alias_to_log_qnames:
        register_log(name, [name])


@contextlib.contextmanager
def inductor_caches_off() -> Iterator[None]:
    """Inductor's on-disk caches off inside the block (torch._inductor.config.force_disable_caches)."""
    import torch._inductor.config

    with torch._inductor.config.patch(force_disable_caches=True):
        yield


def is_erased(node: fx.Node) -> bool:
    """Whether `node` was erased from its graph (fx.Node._erased, private; 2.11 and 2.13)."""
    return bool(getattr(node, "_erased", False))
