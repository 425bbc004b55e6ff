"""Kernels and run-time calls: what the rewritten graphs call, and the pieces the plan stage prices.

    runtime.py     FlexAttention calls of structured and run-time masks, the registries of their mask_mods and
                   score_mods, the asam::block_tables op (Note [Block tables leave the graph through an opaque op])
    block_mask.py  building a Flex BlockMask from a mask_mod at compile time, in chunks, cached
    cost.py        the cost model: Flex or SDPA for a structured mask, and where Flex cannot run at all
    selection.py   the ASAM block selection: the public API that tests and benchmarks use (select, select_blocks,
                   take_by_coverage, block_tables, sampled_mass, block_density, reference)
    adaptive.py    the adaptive calls that the rewrite emits (in-graph, inside a mask, the dense_fallback op)

Settings of the adaptive mode are one asam_compile.config.SparseSettings, passed whole from the plan to the call.
"""
