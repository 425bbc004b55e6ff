"""triton_block_sparse: a block-sparse attention forward in Triton (FlashAttention-2 style) over Flex's kv block tables.

    out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]) @ v[b, h // G]   over the keys j of the
                   kept key blocks of i's query block (and j <= i + S - L when causal); G = H / Hkv

Forward only: the backward of the adaptive mode stays on FlexAttention (Note [Forward only]).

    block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, *, scale, causal, block_size=128,
                           return_lse=False, config=None) -> out | (out, lse)
    kv_head_tables(keep, num_kv_heads)   bool (B, H, QB, KB) per query head -> tables per kv head (the union)
    block_tables(keep)                   bool (B, H', QB, KB) -> (kv_num_blocks, kv_indices), Flex's layout
    choose_config(head_dim, block_size, group, capability, ...) -> KernelConfig, the launch table
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any

import torch

try:  # the kernel's body refers to `tl` as a module global, as every Triton kernel does
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None
    tl = None

log = logging.getLogger(__name__)

__all__ = ["KernelConfig", "block_sparse_attention", "block_tables", "choose_config", "kv_head_tables"]

# Note [Block-sparse table layout]
# The kept key blocks come in FlexAttention's BlockMask layout (the `kv_num_blocks` / `kv_indices` pair of
# torch.nn.attention.flex_attention.BlockMask):
#   kv_num_blocks  int32 (B', H', QB)      how many key blocks query block m keeps
#   kv_indices     int32 (B', H', QB, KB)  the kept key-block indices first (any order), then anything
# with QB = ceil(L / block_size), key block n covering keys [n * block_size, (n + 1) * block_size), B' in
# (1, B) and H' in (1, Hkv, H):
#   H' == Hkv (or 1): one list per kv head, read by all G = H / Hkv query heads of that kv head. Tables per
#                     query head become one per kv head with `kv_head_tables` (the union over the group:
#                     every query head then also attends to the blocks its neighbours kept).
#   H' == H  (> Hkv): one list per query head, exact. Each program then holds the rows of one query head,
#                     so the group's heads share K/V only through L2 (Note [Stacked query heads]).
# Indices are not range-checked (that needs a device sync): each must be < ceil(S / block_size). Unlike
# Flex there is no separate full-block table: the causal diagonal and the ragged last key block are masked
# per element wherever a block reaches them (Note [Element masks]), so the lists say only which blocks run.

# Note [Stacked query heads]
# One program computes BLOCK_M rows of the G * block_size rows that (batch, kv head, query block) owns,
# stacked head-major: row t is query head kv_head * G + t // block_size, position
# m * block_size + t % block_size. When BLOCK_M > block_size (block 64, BLOCK_M 128, G >= 2) one program
# holds several query heads and loads each kept K/V tile once for all of them. When BLOCK_M <= block_size
# the G * block_size / BLOCK_M programs of one (batch, kv head, query block) are launched next to each
# other (grid axis 0 is fastest) and read the same kept K/V tiles at the same time, so those come from L2
# rather than from HBM: 128 rows of one head already give the tile the arithmetic intensity of 128 rows of
# several, and more rows per program do not fit the registers at D = 128 (acc and scores in fp32).
# Query blocks run longest-first (grid axis 1 reversed) so that, when causal, the short ones fill the tail.

# Note [Element masks]
# Causal is aligned to the bottom right, as FlashAttention's: key j is visible from query i when
# j <= i + (S - L), i.e. j <= i for L == S, and the last query row sees the whole cache when S > L. A kept
# block only pays for the element mask when it reaches past the diagonal of the program's first row (or past
# S when S is not a multiple of the block): a run-time branch per tile, so blocks wholly below the diagonal
# run unmasked (masking every tile instead, KernelConfig.mask_always, was 15 % slower at D = 128 on an H200).
# Keys past S are masked, rows past L are computed on zeros and not stored.

# Note [Empty rows]
# A query row that sees no key (its block keeps none, or every kept key is causally masked from it, as for
# the first L - S rows when L > S) outputs 0 and a log-sum-exp of -inf, as Flex does (eager softmax would
# give NaN). The running max is kept at -inf until a key is seen; exp2 then works from a
# max of 0, so no NaN appears (-inf - (-inf) never happens).

# Note [Forward only]
# There is no backward kernel: the adaptive mode's training path stays on FlexAttention. Calling this with
# grad mode on and an input that requires grad raises at once (rather than failing later in backward), so
# a training graph cannot silently run through it.

# Note [Triton's interpreter]
# On a CPU the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1), slowly, for tests. The kernel
# itself is jitted at its first call (_jitted), so the variable may be set after this module is imported;
# but triton.language's own helpers (tl.max, tl.sum, ...) are jitted when triton.language is first imported,
# and torch._dynamo imports Triton: set the variable before importing torch, or see
# tests/test_triton_block_sparse.py, which swaps those helpers for interpreted copies. Triton 3.9's
# interpreter multiplies bfloat16 as raw uint16 bits in tl.dot: on CPU use float16 or float32.


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch meta-parameters of one kernel; `choose_config` picks them, a caller may pass its own."""

    block_m: int  # query rows per program (Note [Stacked query heads]); a power of two >= 16
    block_n: int  # keys per inner step; a power of two >= 16 that divides block_size
    num_warps: int  # 4 or 8: 8 splits BLOCK_M = 128 over two Hopper warpgroups
    num_stages: int  # software-pipelining depth of the K/V loads (shared memory: 2 * BLOCK_N * D * stages)
    mask_always: bool = False  # apply the causal element mask on every tile, not only where it cuts


# Measured on an H200 (torch 2.11, Triton 3.6, bf16, causal, L = 16384, H = 16):
# chosen with benchmarks/adaptive/bench_triton_kernel.py --sweep (2026-12-04).
# head_dim upper bound -> (block_m, block_n, num_warps, num_stages)
_HOPPER = {64: (128, 64, 4, 3), 128: (128, 128, 8, 3), 256: (128, 64, 8, 2)}
# Ampere-class and others (not measured): smaller tiles; fit_config trims them to the shared memory.
_OTHER = {64: (128, 64, 4, 3), 128: (128, 64, 4, 3), 256: (64, 64, 4, 2)}
# The interpreter (TRITON_INTERPRET=1, CPU): large tiles mean fewer Python-level steps.
_INTERPRETER = {64: (128, 128, 4, 1), 128: (128, 128, 4, 1), 256: (128, 128, 4, 1)}
# Opt-in shared memory per block by major capability, where torch does not report it.
_SHARED_MEMORY = {9: 232448, 8: 166912}


@functools.lru_cache(maxsize=256)
def choose_config(head_dim: int, block_size: int, group: int, capability: tuple[int, int] | None,
                  per_q_head: bool = False, itemsize: int = 2, shared_memory: int | None = None) -> KernelConfig:
    """The launch table: tiles by head dim and GPU capability (None: the interpreter), fitted to the block
    size, to the group of G query heads per kv head (Note [Stacked query heads]) and to `shared_memory`
    bytes per block (None: no limit) for inputs of `itemsize` bytes."""
    if capability is None:
        table = _INTERPRETER
    elif capability[0] == 9:
        table = _HOPPER
    else:
        table = _OTHER
    key = min((d for d in table if d >= head_dim), default=max(table))
    config = KernelConfig(*table[key])
    return fit_config(config, block_size, group, per_q_head, head_dim=head_dim, itemsize=itemsize,
                      shared_memory=shared_memory)


def fit_config(config: KernelConfig, block_size: int, group: int, per_q_head: bool, *, head_dim: int = 0,
               itemsize: int = 2, shared_memory: int | None = None) -> KernelConfig:
    """`config` made valid for this call: BLOCK_N divides the block, BLOCK_M divides the G * block_size rows
    of a (batch, kv head, query block) and holds one query head only when the lists are per query head, and
    the tiles fit `shared_memory` (Note [Shared memory of a launch])."""
    for name in ("block_m", "block_n"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"KernelConfig.{name} must be a power of two >= 16; got {value}")
    block_n = min(config.block_n, block_size)
    block_m = config.block_m
    while block_m > block_size and (per_q_head or group % (block_m // block_size)):
        block_m //= 2
    stages = config.num_stages
    while shared_memory is not None and _shared_bytes(block_m, block_n, stages, head_dim, itemsize) > shared_memory:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif stages > 1:
            stages -= 1
        elif block_m > 16:
            block_m //= 2
        else:
            break
    return dataclasses.replace(config, block_m=block_m, block_n=block_n, num_stages=stages)


# Note [Shared memory of a launch]
# Triton keeps `num_stages` buffers of the K and V tiles in shared memory, and on Hopper also the
# probabilities P (BLOCK_M x BLOCK_N) that the second wgmma reads; Q stays in registers. An fp32 D = 256 call
# with (128, 64, 8 warps, 2 stages) asked for 295,424 bytes on an H200 (Triton 3.6), which is this estimate
# plus 512 bytes of barriers; the H200 allows 232,448 per block. Tiles are trimmed (stages, then BLOCK_N,
# then BLOCK_M) until the estimate fits, so fp32 inputs and Ampere-class GPUs launch instead of failing.
def _shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int, itemsize: int) -> int:
    return itemsize * (stages * 2 * block_n * head_dim + block_m * block_n) + 1024


@functools.lru_cache(maxsize=16)
def _device_limits(device: torch.device) -> tuple[tuple[int, int], int | None]:
    """(capability, opt-in shared memory per block) of a CUDA device, read once."""
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    shared = getattr(props, "shared_memory_per_block_optin", None) or _SHARED_MEMORY.get(props.major)
    return capability, shared


def _is_interpreter() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton < 3.4


@functools.cache
def _jitted(interpret: bool) -> Any:
    """The kernel, jitted on first use: whether `triton.jit` builds an interpreted or a compiled kernel is
    decided when it is called (TRITON_INTERPRET), so it is not frozen by whoever imported this module first."""
    del interpret  # the cache key only
    return triton.jit(_block_sparse_fwd)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    block_size: int = 128,
    return_lse: bool = False,
    config: KernelConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, L, D) over the kept key blocks of k, v (B, Hkv, S, D), H a multiple of Hkv.

    kv_num_blocks (B', H', QB) and kv_indices (B', H', QB, KB), int32, are the kept lists in Flex's layout,
    per kv head or per query head (Note [Block-sparse table layout]); `block_size` is both the query and the
    key block. Causal is bottom-right aligned (Note [Element masks]). Returns out (B, H, L, D) in q's dtype,
    and with return_lse the natural log-sum-exp of the scaled scores (B, H, L) float32. A row that sees no key
    gives 0 and -inf (Note [Empty rows]). Forward only (Note [Forward only]). fp16 / bf16; fp32 is accepted
    (dot products in IEEE fp32) for tests. `config` overrides the launch table (`choose_config`).
    """
    if triton is None:
        raise ImportError("block_sparse_attention needs Triton, which is not importable here "
                          "(pip install triton; on CPU it runs only in Triton's interpreter, TRITON_INTERPRET=1)")
    interpret = _is_interpreter()
    _check(q, k, v, kv_num_blocks, kv_indices, scale, block_size, interpret)
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    Bt, Ht, QB = kv_num_blocks.shape
    per_q_head = Ht == H and G > 1
    capability, shared = (None, None) if interpret else _device_limits(q.device)
    if config is None:
        config = choose_config(D, block_size, G, capability, per_q_head, q.element_size(), shared)
    else:
        config = fit_config(config, block_size, G, per_q_head, head_dim=D, itemsize=q.element_size(),
                            shared_memory=shared)
    chunks = G * block_size // config.block_m

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    kv_indices = kv_indices if kv_indices.stride(-1) == 1 else kv_indices.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32) if return_lse else out
    if out.numel() == 0 or S == 0:  # no program to launch, or no key to see (Note [Empty rows])
        out.zero_()
        return (out, lse.fill_(float("-inf"))) if return_lse else out
    # A broadcast (size-1) batch or head dim of the tables is read with stride 0; per kv head tables are
    # indexed by kv head, per query head tables by query head, a single head by either.
    table_b = (kv_num_blocks.stride(0) if Bt > 1 else 0, kv_indices.stride(0) if Bt > 1 else 0)
    table_h = (kv_num_blocks.stride(1) if Ht > 1 else 0, kv_indices.stride(1) if Ht > 1 else 0)
    grid = (chunks * B * Hkv, QB)
    _jitted(interpret)[grid](
        q, k, v, out, lse, kv_num_blocks, kv_indices,
        float(scale) * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        table_b[0], table_h[0], kv_num_blocks.stride(2),
        table_b[1], table_h[1], kv_indices.stride(2),
        Hkv, L, S, S - L, QB,
        G=G, CHUNKS=chunks, BLOCK=block_size, SUBS=block_size // config.block_n, HEAD_DIM=D,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=bool(causal), LIST_PER_Q_HEAD=per_q_head, EVEN_L=L % block_size == 0,
        EVEN_S=S % block_size == 0, MASK_ALWAYS=config.mask_always, WRITE_LSE=return_lse,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return (out, lse) if return_lse else out


# Note [The kernel inside compiled graphs]
# block_sparse_attention launches the kernel eagerly. A compiled graph (the adaptive calls, Note [Adaptive sparse
# attention] in selection.py) calls it as a custom op, asam::block_sparse_attention, whose fake implementation
# gives the output's shape: Inductor compiles the selection and the block tables before it into a few fused
# kernels and calls the op as an extern kernel, instead of the ~10 eager launches (and their Python) around
# the kernel that the measured dispatch made (on an H200 at 16k tokens, Gemma-3 layer 11: the eager block tables
# alone took 0.13-0.3 ms, the kernel at density 0.39 0.37 ms; benchmarks/RESULTS.md, session 9). Not a
# torch.library.triton_op (which lets Inductor see the kernel itself): Inductor 2.11 failed to compile our kernel
# from it (Triton's assertion on the accumulator of tl.dot(p, v, acc)), and there is nothing to fuse into the
# kernel anyway. There is no autograd formula (Note [Forward only]): the adaptive calls take the op only where no
# input needs a gradient (`usable`).
def usable(q: torch.Tensor, block_size: int) -> bool:
    """Whether the compiled graph of an adaptive call should run this kernel on q (B, H, L, D): Triton
    importable, CUDA, float16 or bfloat16, D 64, 128 or 256 (the tuned launch tables), a block of 64 or 128
    (tuned: 128), and no gradient asked of q (Note [Forward only])."""
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (64, 128, 256) and block_size in (64, 128)
            and not (torch.is_grad_enabled() and q.requires_grad))


@torch.library.custom_op("asam::block_sparse_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
        scale: float, causal: bool, block_size: int) -> torch.Tensor:
    """block_sparse_attention as an op that compiled graphs call (Note [The kernel inside compiled graphs])."""
    return block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale=scale, causal=causal,
                                  block_size=block_size)


@_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, scale, causal, block_size):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
           kv_indices: torch.Tensor, scale: float, block_size: int, interpret: bool) -> None:
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise RuntimeError("block_sparse_attention is forward only (no backward kernel): call it under "
                           "torch.no_grad() / inference_mode, or use FlexAttention for training")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, Hkv, S, D) = ({B}, Hkv, S, {D}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"the query heads ({H}) must be a multiple of the kv heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == kv_num_blocks.device == kv_indices.device):
        raise ValueError("q, k, v and the block tables must be on one device")
    if q.device.type == "cpu" and not interpret:
        raise ValueError("block_sparse_attention runs on a GPU; on CPU only in Triton's interpreter "
                         "(TRITON_INTERPRET=1)")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128, 256; got {D}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and positive; got {scale}")
    if kv_num_blocks.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise ValueError(f"kv_num_blocks and kv_indices must be int32; got {kv_num_blocks.dtype}, {kv_indices.dtype}")
    QB = -(-L // block_size)
    if kv_num_blocks.dim() != 3 or kv_indices.dim() != 4 or kv_indices.shape[:3] != kv_num_blocks.shape:
        raise ValueError(f"kv_num_blocks must be (B', H', QB) and kv_indices (B', H', QB, KB); got "
                         f"{tuple(kv_num_blocks.shape)}, {tuple(kv_indices.shape)}")
    Bt, Ht, QBt = kv_num_blocks.shape
    if Bt not in (1, B) or Ht not in (1, Hkv, H) or QBt != QB:
        raise ValueError(f"block tables of shape {tuple(kv_num_blocks.shape)} do not fit q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} with block_size {block_size}: expected ({B} or 1, {H}, {Hkv} or 1, "
                         f"{QB})")


def block_tables(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) int32 of a bool block set (B, H', QB, KB): the kept blocks first, ascending,
    then the others, full width (the order of torch's own _dense_to_ordered)."""
    dense = keep.to(torch.int32)
    num = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), indices.contiguous()


def kv_head_tables(keep: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables per kv head from a bool block set per query head (B, H, QB, KB): the union over each group of
    H / num_kv_heads query heads (Note [Block-sparse table layout]), so that a program reads one list."""
    B, H, QB, KB = keep.shape
    if num_kv_heads <= 0 or H % num_kv_heads:
        raise ValueError(f"the query heads ({H}) must be a multiple of num_kv_heads ({num_kv_heads})")
    union = keep.view(B, num_kv_heads, H // num_kv_heads, QB, KB).any(dim=2)
    return block_tables(union)


# The kernel (jitted on first use by _jitted). One program: BLOCK_M stacked rows of (batch, kv head, query
# block), Note [Stacked query heads]; an online softmax in base 2 over the kept key tiles.
def _block_sparse_fwd(
    Q, K, V, Out, Lse, KvNum, KvIdx,
    qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ol,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    H_KV, L, S, OFFSET, NUM_Q_BLOCKS,
    G: tl.constexpr, CHUNKS: tl.constexpr, BLOCK: tl.constexpr, SUBS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, LIST_PER_Q_HEAD: tl.constexpr, EVEN_L: tl.constexpr, EVEN_S: tl.constexpr,
    MASK_ALWAYS: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    m_block = NUM_Q_BLOCKS - 1 - tl.program_id(1)
    chunk = pid % CHUNKS
    bh = pid // CHUNKS
    b = (bh // H_KV).to(tl.int64)
    kv_head = bh % H_KV

    rows = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    head = (kv_head * G + rows // BLOCK).to(tl.int64)
    pos = m_block * BLOCK + rows % BLOCK
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None].to(tl.int64) * stride_ql + offs_d[None, :]
    if EVEN_L:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(pos < L)[:, None], other=0.0)

    if LIST_PER_Q_HEAD:
        list_head = kv_head * G + (chunk * BLOCK_M) // BLOCK
    else:
        list_head = kv_head
    n_kept = tl.load(KvNum + b * stride_nb + list_head * stride_nh + m_block * stride_nq)
    idx_row = KvIdx + b * stride_ib + list_head * stride_ih + m_block * stride_iq
    k_base = K + b * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kv_head.to(tl.int64) * stride_vh
    # The program's first query position: tiles ending at or below its diagonal need no causal mask.
    first_visible = m_block * BLOCK + (chunk * BLOCK_M) % BLOCK + OFFSET
    offs_n0 = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, n_kept * SUBS):
        kv_block = tl.load(idx_row + j // SUBS)
        start_n = kv_block * BLOCK + (j % SUBS) * BLOCK_N
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        if EVEN_S:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if CAUSAL:
            if MASK_ALWAYS:
                qk = tl.where(offs_n[None, :] <= pos[:, None] + OFFSET, qk, float("-inf"))
            elif start_n + BLOCK_N - 1 > first_visible:
                qk = tl.where(offs_n[None, :] <= pos[:, None] + OFFSET, qk, float("-inf"))
        if not EVEN_S:
            if start_n + BLOCK_N > S:
                qk = tl.where((offs_n < S)[None, :], qk, float("-inf"))
        # Note [Empty rows]: the max stays -inf until a key is seen; the exponent then works from 0.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EVEN_S:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + pos[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    if EVEN_L:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(pos < L)[:, None])
    if WRITE_LSE:
        # natural log: (m + log2 l) / log2(e); -inf for an empty row (l = 0, m = -inf)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        lse_ptrs = Lse + ((b * H_KV * G + head) * L + pos)
        if EVEN_L:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=pos < L)
