"""The Triton block-sparse forward against a float64 dense reference: head dims, GQA, causal, ragged lengths,
both table layouts, empty rows. On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from asam_compile.kernels import triton_block_sparse as tbs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# numpy's warning for the log-sum-exp of an empty row (Note [Empty rows]), in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


# Note [Triton's interpreter after torch imported Triton]
# TRITON_INTERPRET=1 is read when a function is jitted. Our kernel is jitted at its first call
# (tbs._jitted), but triton.language's own helpers (tl.max, tl.sum, tl.zeros, ...) are jitted when
# triton.language is imported, and torch._dynamo (conftest.py) imports Triton before this module: they are
# then compiled-mode functions that the interpreter cannot call ("Cannot call @triton.jit'd outside of the
# scope of a kernel"; Triton 3.6 - 3.9). For this module only, the public ones are swapped for interpreted
# copies; the private combine functions stay, because the interpreter recognises them by identity to take
# its numpy reductions. Where Triton was imported with the variable already set, nothing changes.


def _interpret_triton_language(mp: pytest.MonkeyPatch) -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for module in (tl, tl.standard, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and not name.startswith("_"):
                mp.setattr(module, name, InterpretedFunction(value.fn))


@pytest.fixture(autouse=True, scope="module")
def interpreter_on_cpu():
    """On CPU, Triton's interpreter, for this module only (Note [Triton's interpreter after torch imported
    Triton])."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        _interpret_triton_language(mp)
        yield


def test_the_interpreter_runs_the_kernel_on_cpu():
    if DEVICE == "cuda":
        pytest.skip("compiled on this machine")
    assert os.environ["TRITON_INTERPRET"] == "1"
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tbs._jitted(tbs._is_interpreter()), InterpretedFunction)


# ------------------------------------------------------------------------------------------------ helpers


def dense_blocks(num: torch.Tensor, idx: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """bool (B', H', QB, n_kv_blocks) from Flex-layout tables."""
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    out = torch.zeros(*num.shape, n_kv_blocks + 1, dtype=torch.int32, device=idx.device)
    # unused columns are sent to the spare last column
    out.scatter_add_(-1, torch.where(used, idx.long(), n_kv_blocks), used.int())
    return out[..., :n_kv_blocks] > 0


def reference(q, k, v, num, idx, *, scale, causal, block_size):
    """(out, lse) in float64: dense attention over the kept blocks expanded to elements, causal bottom-right;
    rows that see nothing give 0 and -inf."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    nk = -(-S // block_size)
    blocks = dense_blocks(num, idx, nk)
    if blocks.shape[1] == Hkv and Hkv != H:
        blocks = blocks.repeat_interleave(G, dim=1)
    blocks = blocks.expand(B, H, -1, -1)
    elem = blocks.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :L, :S]
    if causal:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        elem = elem & (j <= i + (S - L))
    kk = k.double().repeat_interleave(G, dim=1)
    vv = v.double().repeat_interleave(G, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~elem, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ vv, lse


def random_keep(B, Hl, QB, KB, density, *, causal, generator, diagonal=True):
    """A random bool block set; with `diagonal`, block 0 and the diagonal block are always kept."""
    keep = torch.rand(B, Hl, QB, KB, generator=generator) < density
    if causal:
        keep &= torch.ones(QB, KB, dtype=torch.bool).tril(diagonal=KB - QB)
    if diagonal:
        keep[..., 0] = True
        for m in range(QB):
            if 0 <= m + KB - QB:
                keep[..., m, min(m + KB - QB, KB - 1)] = True
    return keep


def shuffled_tables(keep, generator):
    """Flex-layout tables whose kept indices come first in a random order (the kernel may not rely on order)."""
    num, idx = tbs.block_tables(keep)
    perm = torch.rand(idx.shape, generator=generator).argsort(-1)
    kept_first = torch.where(torch.arange(idx.shape[-1]) < num[..., None], perm, perm + idx.shape[-1])
    order = kept_first.argsort(-1)
    return num, torch.gather(idx, -1, order).to(torch.int32).contiguous()


def run_case(*, B=1, H=4, Hkv=2, L=256, S=None, D=64, block_size=128, causal=True, density=0.5,
             per_q_head=False, dtype=torch.float32, config=None, seed=0, shuffle=True, keep=None):
    S = L if S is None else S
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float32).to(dtype)
    QB, KB = -(-L // block_size), -(-S // block_size)
    if keep is None:
        keep = random_keep(B, H if per_q_head else Hkv, QB, KB, density, causal=causal, generator=g)
    num, idx = shuffled_tables(keep, g) if shuffle else tbs.block_tables(keep)
    scale = D ** -0.5
    ref_out, ref_lse = reference(q, k, v, num, idx, scale=scale, causal=causal, block_size=block_size)
    dev = [x.to(DEVICE) for x in (q, k, v, num, idx)]
    out, lse = tbs.block_sparse_attention(*dev, scale=scale, causal=causal, block_size=block_size,
                                          return_lse=True, config=config)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
    return out.cpu(), lse.cpu(), ref_out, ref_lse, (q, k, v)


def assert_close(out, lse, ref_out, ref_lse, dtype=torch.float32):
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    err = (out.double() - ref_out).abs().max().item()
    assert err < atol, f"max abs error {err}"
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < atol * 10


def assert_sparsity_matters(q, k, v, ref_out, *, causal):
    """The reference differs from plain (causal) attention: a kernel that ignored the lists would fail."""
    G = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(G, dim=1) for x in (k, v))
    L, S = q.shape[2], k.shape[2]
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L) if causal else torch.ones(L, S, dtype=torch.bool)
    scores = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    dense = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ vv
    assert (dense - ref_out).abs().max().item() > 0.05


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_matches_float64_reference_for_each_head_dim(D, causal):
    out, lse, ref_out, ref_lse, qkv = run_case(D=D, causal=causal, L=384, block_size=64, density=0.5)
    assert_close(out, lse, ref_out, ref_lse)
    assert_sparsity_matters(*qkv, ref_out, causal=causal)


@pytest.mark.parametrize("H, Hkv", [(4, 1), (4, 2)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_gqa_groups_share_per_kv_head_lists(H, Hkv, block_size):
    # block 64 with BLOCK_M 128 stacks two query heads of a group in one program
    L = 4 * block_size
    out, lse, ref_out, ref_lse, qkv = run_case(H=H, Hkv=Hkv, block_size=block_size, L=L, density=0.4)
    assert_close(out, lse, ref_out, ref_lse)
    assert_sparsity_matters(*qkv, ref_out, causal=True)


def test_stacked_heads_program_matches_one_head_programs():
    cfg = tbs.KernelConfig(block_m=256, block_n=64, num_warps=4, num_stages=1)
    assert tbs.fit_config(cfg, 64, 4, per_q_head=False).block_m == 256
    assert tbs.fit_config(cfg, 64, 4, per_q_head=True).block_m == 64
    assert tbs.fit_config(cfg, 64, 3, per_q_head=False).block_m == 64
    out, lse, ref_out, ref_lse, _ = run_case(H=4, Hkv=1, block_size=64, L=192, causal=True, config=cfg)
    assert_close(out, lse, ref_out, ref_lse)


def test_launch_configs_are_trimmed_to_the_shared_memory():
    # fp32 at D = 256 asked for 295,424 bytes with these tiles on an H200 (limit 232,448)
    cfg = tbs.fit_config(tbs.KernelConfig(128, 64, 8, 2), 128, 1, False, head_dim=256, itemsize=4,
                         shared_memory=232448)
    assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (128, 32, 2)
    assert tbs._shared_bytes(128, 32, 2, 256, 4) <= 232448 < tbs._shared_bytes(128, 64, 2, 256, 4)
    # the bf16 tables of an H200 fit as they are
    for D in (64, 128, 256):
        hopper = tbs.KernelConfig(*tbs._HOPPER[D])
        assert tbs.choose_config(D, 128, 1, (9, 0), False, 2, 232448) == hopper


@pytest.mark.parametrize("H, Hkv", [(4, 1), (4, 4)])
def test_per_query_head_lists_are_exact_per_head(H, Hkv):
    out, lse, ref_out, ref_lse, qkv = run_case(H=H, Hkv=Hkv, block_size=64, L=256, per_q_head=True, density=0.4)
    assert_close(out, lse, ref_out, ref_lse)
    # the heads of one group really attend to different blocks
    if Hkv == 1:
        assert (ref_out[:, 0] - ref_out[:, 1]).abs().max() > 0.05


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_lengths_not_a_multiple_of_the_block(block_size, causal):
    out, lse, ref_out, ref_lse, qkv = run_case(L=200, block_size=block_size, causal=causal, density=0.6, seed=3)
    assert_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("L, S", [(100, 300), (300, 100)])
def test_causal_is_bottom_right_aligned_with_a_cache_offset(L, S):
    out, lse, ref_out, ref_lse, qkv = run_case(L=L, S=S, block_size=64, causal=True, density=1.0, seed=4)
    assert_close(out, lse, ref_out, ref_lse)
    if L > S:  # the first L - S rows see no key
        assert torch.equal(out[:, :, : L - S], torch.zeros_like(out[:, :, : L - S]))
        assert torch.isneginf(lse[:, :, : L - S]).all()


def test_key_tiles_smaller_than_the_block_and_masks_on_every_tile():
    for cfg in (tbs.KernelConfig(128, 32, 4, 1), tbs.KernelConfig(64, 64, 4, 1, mask_always=True)):
        out, lse, ref_out, ref_lse, _ = run_case(L=320, D=64, block_size=128, causal=True, config=cfg, seed=5)
        assert_close(out, lse, ref_out, ref_lse)


def test_a_row_with_no_kept_block_gives_zero_and_neginf_lse():
    g = torch.Generator().manual_seed(6)
    keep = random_keep(1, 2, 4, 4, 0.5, causal=True, generator=g)
    keep[0, 1, 2] = False  # kv head 1, query block 2 keeps nothing
    out, lse, ref_out, ref_lse, _ = run_case(H=4, Hkv=2, L=256, block_size=64, keep=keep)
    assert_close(out, lse, ref_out, ref_lse)
    rows = slice(128, 192)
    for h in (2, 3):  # the query heads of kv head 1
        assert torch.equal(out[0, h, rows], torch.zeros_like(out[0, h, rows]))
        assert torch.isneginf(lse[0, h, rows]).all()
    assert out[0, 0, rows].abs().max() > 0  # the other group is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_return_their_dtype(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton 3.9's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those raw bits
        pytest.skip("Triton's interpreter has no bfloat16 tl.dot")
    out, lse, ref_out, ref_lse, _ = run_case(L=128, D=64, block_size=64, dtype=dtype, density=0.7, seed=7)
    assert_close(out, lse, ref_out, ref_lse, dtype=dtype)


def test_broadcast_table_dims_are_read_with_stride_zero():
    g = torch.Generator().manual_seed(8)
    keep = random_keep(1, 1, 4, 4, 0.5, causal=True, generator=g)
    out, lse, ref_out, ref_lse, _ = run_case(B=2, H=4, Hkv=2, L=256, block_size=64, keep=keep)
    assert_close(out, lse, ref_out, ref_lse)


def test_kv_head_tables_are_the_union_over_the_group():
    g = torch.Generator().manual_seed(9)
    keep = torch.rand(2, 6, 3, 5, generator=g) < 0.3
    num, idx = tbs.kv_head_tables(keep, 2)
    assert num.dtype == idx.dtype == torch.int32 and idx.shape == (2, 2, 3, 5)
    expected = keep.view(2, 2, 3, 3, 5).any(2)
    assert torch.equal(dense_blocks(num, idx, 5), expected)
    assert torch.equal(num, expected.sum(-1).int())
    # kept blocks first, ascending
    for b, h, m in [(0, 0, 0), (1, 1, 2)]:
        n = int(num[b, h, m])
        assert idx[b, h, m, :n].tolist() == expected[b, h, m].nonzero().flatten().tolist()


def test_forward_only_raises_when_grad_is_needed():
    q = torch.randn(1, 2, 64, 64, device=DEVICE, requires_grad=True)
    k = v = torch.randn(1, 2, 64, 64, device=DEVICE)
    num, idx = tbs.block_tables(torch.ones(1, 2, 1, 1, dtype=torch.bool, device=DEVICE))
    with pytest.raises(RuntimeError, match="forward only"):
        tbs.block_sparse_attention(q, k, v, num, idx, scale=0.125, causal=True, block_size=64)
    with torch.no_grad():
        out = tbs.block_sparse_attention(q, k, v, num, idx, scale=0.125, causal=True, block_size=64)
    assert out.shape == q.shape


def test_bad_arguments_raise_clear_errors():
    q = torch.randn(1, 4, 128, 64, device=DEVICE)
    k = v = torch.randn(1, 2, 128, 64, device=DEVICE)
    num, idx = tbs.block_tables(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE))
    call = tbs.block_sparse_attention
    with pytest.raises(ValueError, match="block tables of shape"):
        call(q, k, v, num[:, :, :1], idx[:, :, :1], scale=0.125, causal=False, block_size=64)
    with pytest.raises(ValueError, match="int32"):
        call(q, k, v, num.long(), idx, scale=0.125, causal=False, block_size=64)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        call(q[:, :3], k, v, num, idx, scale=0.125, causal=False, block_size=64)
    with pytest.raises(ValueError, match="head dim"):
        call(q[..., :48], k[..., :48], v[..., :48], num, idx, scale=0.125, causal=False, block_size=64)
    with pytest.raises(ValueError, match="scale"):
        call(q, k, v, num, idx, scale=-1.0, causal=False, block_size=64)


def test_missing_triton_raises_import_error(monkeypatch):
    monkeypatch.setattr(tbs, "triton", None)
    q = torch.randn(1, 1, 64, 64)
    num, idx = tbs.block_tables(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ImportError, match="needs Triton"):
        tbs.block_sparse_attention(q, q, q, num, idx, scale=0.125, causal=False, block_size=64)


def test_no_keys_gives_zero_and_no_queries_gives_an_empty_result():
    q = torch.randn(1, 2, 64, 64, device=DEVICE)
    k = v = torch.randn(1, 2, 0, 64, device=DEVICE)
    num = torch.zeros(1, 2, 1, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(1, 2, 1, 0, dtype=torch.int32, device=DEVICE)
    out, lse = tbs.block_sparse_attention(q, k, v, num, idx, scale=0.125, causal=False, block_size=64,
                                          return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    k = v = torch.randn(1, 2, 64, 64, device=DEVICE)
    out = tbs.block_sparse_attention(q[:, :, :0], k, v, num[..., :0], idx[..., :0, :], scale=0.125, causal=True,
                                     block_size=64)
    assert out.shape == (1, 2, 0, 64)


# ------------------------------------------------- the op that compiled graphs trace into (Note [The kernel
# inside compiled graphs])


def _op_inputs(seed=3, L=256, H=4, Hkv=2, D=64, block_size=64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    if DEVICE == "cuda":
        q, k, v = (x.to(torch.float16) for x in (q, k, v))
    QB = -(-L // block_size)
    keep = random_keep(1, H, QB, QB, 0.5, causal=True, generator=g)
    num, idx = tbs.block_tables(keep)
    return [x.to(DEVICE) for x in (q, k, v, num, idx)], keep


def test_the_op_gives_what_the_function_gives():
    (q, k, v, num, idx), _ = _op_inputs()
    expected = tbs.block_sparse_attention(q, k, v, num, idx, scale=0.125, causal=True, block_size=64)
    got = torch.ops.asam.block_sparse_attention(q, k, v, num, idx, 0.125, True, 64)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.equal(got, expected)
    ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), num.cpu(), idx.cpu(), scale=0.125, causal=True, block_size=64)
    assert (got.cpu().double() - ref).abs().max().item() < (2e-5 if q.dtype == torch.float32 else 2e-2)


def test_the_op_has_a_fake_implementation_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (q, k, v, num, idx), _ = _op_inputs()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fn, fi = (mode.from_tensor(x) for x in (q, k, v, num, idx))
        out = torch.ops.asam.block_sparse_attention(fq, fk, fv, fn, fi, 0.125, True, 64)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor compiles user Triton kernels on CUDA only")
def test_a_compiled_graph_runs_the_kernel_with_the_tables_built_in_the_graph():
    from asam_compile.kernels.selection import block_tables

    (q, k, v, _, _), keep = _op_inputs(L=1024, H=8, Hkv=2, D=128, block_size=128)
    keep = keep.to(DEVICE)

    def f(q, k, v, keep):
        num, idx = block_tables(keep)
        return torch.ops.asam.block_sparse_attention(q, k, v, num, idx, 0.1, True, 128)

    with torch.no_grad():
        assert torch.equal(torch.compile(f, fullgraph=True)(q, k, v, keep), f(q, k, v, keep))


# ------------------------------------- the measured dispatch's Triton branches (Note [Dispatch by measured
# density]), run here through the interpreter with the compiled path left eager


@pytest.mark.parametrize("kernel_speed", [0.8, 1.0], ids=["gathered", "all_heads"])
def test_dispatch_split_on_the_triton_kernel(monkeypatch, kernel_speed):
    """run_split with heads 0 and 2 sparse: below SDPA's speed per block the sparse heads are gathered for the
    Triton path and the others run SDPA; at SDPA's speed one call takes all heads, the dense ones with all their
    blocks. Either way the sparse heads equal the reference of their own selection, the dense heads exact."""
    from asam_compile.config import SparseSettings
    from asam_compile.kernels import cost, dispatch, selection
    from test_adaptive import planted

    monkeypatch.setattr(dispatch, "sparse_kernel", lambda q, block_size: "triton")
    monkeypatch.setattr(dispatch, "compiled_triton_path", lambda: dispatch._triton_path)
    monkeypatch.setitem(cost.SPARSE_BLOCK_SPEED, "triton", {64: kernel_speed, 128: kernel_speed, 256: 1.0})
    q, k, v = (x.to(DEVICE) for x in planted(H=4, L=512, E=64))
    k, v = k[:, ::2].contiguous(), v[:, ::2].contiguous()  # 2 kv heads: heads 0, 2 read different ones
    st = SparseSettings(128, 0.8, 1.0, 0, 1, 1)
    scale = 64**-0.5
    with torch.no_grad():
        out = dispatch.run_split(q, k, v, st, scale, True, (0, 2))
    ref_dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                                 v.double().repeat_interleave(2, 1), is_causal=True)
    for h in (1, 3):
        assert (out[:, h].double() - ref_dense[:, h]).abs().max() < 1e-4, h
    for h in (0, 2):
        qh, kh, vh = q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1]
        kept, _, allowed = selection.select_blocks(qh, kh, scale=scale, causal=True, settings=st)
        assert kept.sum() < 0.8 * allowed.expand_as(kept).sum(), "the planted head should keep few blocks"
        ref, _ = selection.reference(qh.double(), kh.double(), vh.double(), scale=scale, causal=True, settings=st,
                                     kept=kept)
        assert (out[:, h:h + 1].double() - ref).abs().max() < 1e-4, h
        assert (out[:, h].double() - ref_dense[:, h]).abs().max() > 1e-3, "sparse heads should differ from exact"
