"""Which exact kernel an attention site with a structured mask should run: SDPA with a dense mask or Flex."""

from __future__ import annotations

# Calibration: benchmarks/exact/calibrate_cost.py on an H100 80GB (torch 2.11, bf16, B=1, H=16, D=128, 2k-32k tokens,
# windows 256-4096 and causal; 2026-11-26, benchmarks/results/2026-11-26_h100_calibrate_cost.json). Fitted:
# SDPA flash 549 TFLOP/s; Flex at 0.68x of that on the blocks it computes, plus 27 us a call; SDPA with a
# dense L x S mask (what a mask that is neither causal nor absent gets; cuDNN picks it up) at 0.52x of flash
# plus reading the mask once (2 bytes an element at 3 TB/s). With these constants the cost model picks the
# faster kernel in 27/27 measured cases (the earlier guesses: 24/27; all 3 misses at 2k tokens).
FLASH_FLOPS = 549e12
FLEX_SPEED = 0.68  # Flex's rate relative to SDPA flash on the blocks it computes
MASKED_SDPA_SPEED = 0.52  # SDPA with a dense mask, relative to flash
FLEX_OVERHEAD_S = 2.7e-5
HBM_BYTES_PER_S = 3.0e12
# CPU: compiled Flex runs inference only (no backward), and has not been timed against SDPA here; take it
# only where it skips at least three quarters of the blocks of a long sequence.
CPU_MAX_DENSITY = 0.25
CPU_MIN_ELEMENTS = 4096 * 4096

# The adaptive call's speed per kept block relative to SDPA flash, by head dim (issue 16; benchmarks/RESULTS.md,
# session 8): Flex at D <= 128 as above; at D = 256 (Gemma-3) it ran the whole causal attention of a 16k layer in
# about 2.0 ms where flash took 0.93 ms on an H200, 0.46x. A head pays sparse when its density is below this
# ratio times SPARSE_MARGIN (the selection and the call's launches take the rest).
SPARSE_BLOCK_SPEED = {64: FLEX_SPEED, 128: FLEX_SPEED, 256: 0.46}
SPARSE_MARGIN = 0.9


def sparse_pays_below(E: int, device_type: str) -> float:
    """The density below which a head is faster run sparse than by SDPA (Note [Dispatch by measured density])."""
    if device_type != "cuda":
        return 1.0  # not timed on CPU: max_density decides alone
    speed = SPARSE_BLOCK_SPEED.get(E, SPARSE_BLOCK_SPEED[256] if E > 128 else FLEX_SPEED)
    return speed * SPARSE_MARGIN


def flex_unavailable(*, E: int, device_type: str, requires_grad: bool, policy: str = "auto") -> str | None:
    """Why compiled Flex cannot (or may not) run a site here, or None. `policy` is the `flex` option."""
    if policy == "never":
        return "flex='never'"
    if device_type == "cpu" and requires_grad:
        return "compiled Flex has no backward on CPU"
    if device_type == "cuda" and E < 16:
        return f"Flex needs head dim >= 16 on CUDA (got {E})"
    return None


def choose_kernel(
    *, B: int, H: int, L: int, S: int, E: int, density: float, device_type: str, requires_grad: bool, policy: str,
    build_s: float = 0.0,
) -> tuple[str, str]:
    """("flex" | "sdpa", reason) for one site. `policy` is the `flex` option: "auto", "always" or "never".
    `build_s`: seconds to build the block mask on every call (masks read at run time; 0 for constant ones)."""
    why = flex_unavailable(E=E, device_type=device_type, requires_grad=requires_grad, policy=policy)
    if why is not None:
        return "sdpa", why
    if policy == "always":
        return "flex", f"flex='always' (block density {density:.2f})"
    work = 4.0 * B * H * L * S * E
    if device_type == "cuda":
        t_sdpa = work / (FLASH_FLOPS * MASKED_SDPA_SPEED) + 2.0 * B * L * S / HBM_BYTES_PER_S
        t_flex = FLEX_OVERHEAD_S + build_s + density * work / (FLASH_FLOPS * FLEX_SPEED)
        if t_flex < t_sdpa:
            return "flex", f"block density {density:.2f}: est. Flex {t_flex * 1e3:.3f} ms < SDPA+mask {t_sdpa * 1e3:.3f} ms"
        return "sdpa", f"block density {density:.2f}: est. SDPA+mask {t_sdpa * 1e3:.3f} ms <= Flex {t_flex * 1e3:.3f} ms"
    if density <= CPU_MAX_DENSITY and L * S >= CPU_MIN_ELEMENTS:
        return "flex", f"block density {density:.2f} on CPU"
    return "sdpa", f"block density {density:.2f} at {L}x{S} on {device_type}: dense SDPA"
