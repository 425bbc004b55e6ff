"""The adaptive mode's block estimators (Note [Block estimators] in asam_compile/kernels/selection.py): what each
computes, that the selection they feed keeps the blocks holding the mass, and that the compiled graph selects
what eager does. CPU, small shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import asam_compile
from asam_compile.config import ESTIMATORS, SparseSettings
from asam_compile.kernels import selection

BS = 64
E = 32


def qkv(L=1000, H=4, Hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, L, E, generator=g), torch.randn(1, Hkv, L, E, generator=g),
            torch.randn(1, Hkv, L, E, generator=g))


def settings(estimator, coverage, window=1, sinks=0):
    return SparseSettings.checked(block_size=BS, coverage=coverage, max_density=1.0, min_seq_len=0, window=window,
                                  sinks=sinks, estimator=estimator)


def true_block_mass(q, k, scale):
    """Each row's exact causal softmax (float64) summed per key block: (B, H, L, KB)."""
    L = q.shape[2]
    KB = -(-L // BS)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1).double()
    scores = (q.double() @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return F.pad(scores.softmax(-1), (0, KB * BS - L)).view(*q.shape[:3], KB, BS).sum(-1)


def kept_mass(kept, m):
    """True mass each row keeps: kept (B, H, QB, KB) over m (B, H, L, KB)."""
    rows = torch.arange(m.shape[2]) // BS
    return (m * kept[:, :, rows].double()).sum(-1)


def by_rule(mass, st):
    """The package's rule (Note [Adaptive sparse attention]) on any block mass (B, H, QB, KB), causal."""
    L = mass.shape[2] * BS
    forced, allowed, _ = selection.forced_blocks(L, L, causal=True, settings=st)
    need = st.coverage - (mass * forced).sum(-1, keepdim=True)
    return forced | selection.take_by_coverage(mass.masked_fill(forced | ~allowed, 0.0), need)


def oracle_kept(m, st):
    """The rule applied to the true mass averaged over each query block's rows (the oracle)."""
    L = m.shape[2]
    QB = -(-L // BS)
    avg = F.pad(m, (0, 0, 0, QB * BS - L)).view(*m.shape[:2], QB, BS, -1).sum(3)
    return by_rule((avg / torch.clamp(L - torch.arange(QB) * BS, max=BS).view(QB, 1)).float(), st)


def spike_keys(L=1024, H=2, seed=0):
    """Per query block i >= 4: one key of a far block that every query of block i attends to strongly (an
    induction-like hit: one key, most of the rows' mass) while the block's other keys lean mildly away from the
    queries, and a decoy block whose keys all lean mildly towards them. Block means make the decoy look heaviest
    and the spike's block lightest; the true mass is the spike's."""
    g = torch.Generator().manual_seed(seed)
    QB = L // BS
    q = 0.2 * torch.randn(1, H, L, E, generator=g)
    k = 0.2 * torch.randn(1, 1, L, E, generator=g)
    spikes = {}
    for i in range(4, QB):
        u = torch.randn(E, generator=g)
        u = u / u.norm()
        spike, decoy = (i * 5 + 1) % (i - 2), (i * 3 + 2) % (i - 2)
        if decoy == spike:
            decoy = (spike + 1) % (i - 2)
        q[..., i * BS:(i + 1) * BS, :] += 8.0 * u
        key = spike * BS + (i * 11) % BS
        k[..., spike * BS:(spike + 1) * BS, :] -= 0.3 * u  # q.k * scale ~ -0.4: the block mean cancels the spike
        k[..., key, :] = 12.0 * u  # ~ 8 * 12 / sqrt(32) = 17: a spike
        k[..., decoy * BS:(decoy + 1) * BS, :] += 1.0 * u  # ~1.4 on every key of the decoy block
        spikes[i] = (spike, decoy)
    return q, k, spikes


def graded(L=2048, H=2, seed=1):
    """Per query block i >= 2 a direction its queries share; every earlier key block leans towards it by a random
    amount (a few much more than the rest: w^3) and holds 0-2 spike keys of random strength: mass spread over
    a few blocks at graded weights, part of it on single keys."""
    g = torch.Generator().manual_seed(seed)
    q = 0.3 * torch.randn(1, H, L, E, generator=g)
    k = 0.3 * torch.randn(1, 1, L, E, generator=g)
    for i in range(2, L // BS):
        u = torch.randn(E, generator=g)
        u = u / u.norm()
        q[..., i * BS:(i + 1) * BS, :] += 4.0 * u
        w = torch.rand(i, generator=g) ** 3
        for j in range(i):
            k[..., j * BS:(j + 1) * BS, :] += 6.0 * w[j] * u
            for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
                key = j * BS + int(torch.randint(0, BS, (1,), generator=g))
                k[..., key, :] += float(torch.rand(1, generator=g)) * 16.0 * u
    return q, k


def diverse_rows(L=1024, H=2, seed=0):
    """Per query block i >= 4: every query leans towards the first key (an attention sink: a third of each row's
    mass), and each group of 8 rows towards its own earlier block, whose keys all lean back (the rest). The block's
    mean query keeps the shared sink and averages the groups' directions away: it puts ~0.8 on the sink."""
    g = torch.Generator().manual_seed(seed)
    q = 0.2 * torch.randn(1, H, L, E, generator=g)
    k = 0.2 * torch.randn(1, 1, L, E, generator=g)
    sink = torch.randn(E, generator=g)
    sink = sink / sink.norm()
    k[..., 0, :] += 12.0 * sink
    for i in range(4, L // BS):
        q[..., i * BS:(i + 1) * BS, :] += 4.7 * sink  # q.k * scale ~ 10 on the sink
        for group in range(BS // 8):
            u = torch.randn(E, generator=g)
            u = u / u.norm()
            target = 1 + int(torch.randint(0, i - 2, (1,), generator=g))
            q[..., i * BS + 8 * group:i * BS + 8 * (group + 1), :] += 4.0 * u
            k[..., target * BS:(target + 1) * BS, :] += 8.5 * u  # ~6 on every key of the group's block
    return q, k


# ------------------------------------------------------------------------------------------- what they compute


def half_case(monkeypatch, chunk, causal, L=1000):
    """The inputs of one half of "dual" checked against float64: (L, scale, q, k, QB, block index, allowed blocks,
    rows per block as float64), with the estimators' chunk size set to `chunk` (L = 1000: a ragged last block)."""
    monkeypatch.setattr(selection, "_SAMPLED_CHUNK", chunk)
    q, k, _ = qkv(L)
    QB = -(-L // BS)
    i = torch.arange(QB)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(QB, QB, dtype=torch.bool)
    return L, E**-0.5, q, k, QB, i, allowed, torch.clamp(L - i * BS, max=BS).double()


def block_mean(x, n):
    """float64 mean of x (1, H, L, E) over each block of BS rows, the ragged last one over its n rows."""
    QB = n.numel()
    return F.pad(x.double(), (0, 0, 0, QB * BS - x.shape[2])).view(*x.shape[:2], QB, BS, E).sum(3) / n.view(QB, 1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("chunk", [1 << 26, 1000], ids=["one_chunk", "chunked"])
def test_pooled_q_mass_is_the_softmax_of_each_blocks_mean_query_over_every_key(causal, chunk, monkeypatch):
    """Note [Block estimators]: half of "dual" is the mean query of each block against every key (GQA by groups,
    causal up to the block's last row), its softmax summed per key block; chunking and a ragged last block
    change nothing."""
    L, scale, q, k, QB, i, allowed, n = half_case(monkeypatch, chunk, causal)
    mass = selection.pooled_q_mass(q, k, scale, causal, allowed, BS)
    qbar = block_mean(q, n)
    scores = qbar @ k.double().repeat_interleave(2, 1).transpose(-2, -1) * scale  # (1, 4, QB, L)
    if causal:
        last = torch.clamp((i + 1) * BS, max=L) - 1
        scores = scores.masked_fill(torch.arange(L)[None, :] > last[:, None], float("-inf"))
    want = F.pad(scores.softmax(-1), (0, QB * BS - L)).view(1, 4, QB, QB, BS).sum(-1)
    torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, QB), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("chunk", [1 << 26, 1000], ids=["one_chunk", "chunked"])
def test_pooled_k_mass_is_each_rows_softmax_over_the_mean_keys_averaged_per_block(causal, chunk, monkeypatch):
    """Note [Block estimators]: the other half of "dual" is every query row against each key block's mean key
    plus the log of its length (causal: the blocks starting at or before the row), its softmax averaged over the
    query block's rows; chunking, GQA and a ragged last block change nothing."""
    L, scale, q, k, QB, i, allowed, n = half_case(monkeypatch, chunk, causal)
    mass = selection.pooled_k_mass(q, k, scale, causal, allowed, BS)
    kbar = block_mean(k, n)
    scores = q.double() @ kbar.repeat_interleave(2, 1).transpose(-2, -1) * scale + n.log()  # (1, 4, L, QB)
    if causal:
        scores = scores.masked_fill(i[None, :] * BS > torch.arange(L)[:, None], float("-inf"))
    p = F.pad(scores.softmax(-1), (0, 0, 0, QB * BS - L)).view(1, 4, QB, BS, QB).sum(3)
    torch.testing.assert_close(mass.double(), p / n.view(QB, 1), atol=1e-5, rtol=1e-4)


def test_dual_mass_is_the_mean_of_its_halves_and_bf16_moves_it_by_rounding_only():
    """"dual" averages the two pooled views; its matmuls run in q's dtype (bf16 on a GPU), which moves the
    estimate by bf16's rounding, not more."""
    q, k, _ = qkv(L=512)
    QB = 512 // BS
    allowed = torch.ones(QB, QB, dtype=torch.bool).tril()
    full = selection.dual_mass(q, k, E**-0.5, True, allowed, BS)
    halves = [f(q, k, E**-0.5, True, allowed, BS) for f in (selection.pooled_q_mass, selection.pooled_k_mass)]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)
    half = selection.dual_mass(q.bfloat16(), k.bfloat16(), E**-0.5, True, allowed, BS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.03, rtol=0.1)


# ---------------------------------------------------------------------------------------- what they keep


def test_dual_keeps_the_far_block_of_a_spike_key_that_pooling_dilutes():
    """One key of a far block holds most of a query block's mass; a decoy block leans towards the queries on
    all of its keys. "dual" must keep the spike's block for every query block (and the asked mass); the block
    means of "pooled" rank the decoy first and miss it (the failure seen on Gemma-3's layer 11)."""
    q, k, spikes = spike_keys()
    scale = E**-0.5
    m = true_block_mass(q, k, scale)
    for estimator, finds in (("dual", True), ("pooled", False)):
        kept = selection.select_blocks(q, k, scale=scale, causal=True, settings=settings(estimator, 0.3))[0]
        found = [bool(kept[0, h, i, spike]) for h in range(2) for i, (spike, _) in spikes.items()]
        assert all(found) if finds else not any(found), (estimator, found)
        if finds:
            assert kept_mass(kept, m)[..., 4 * BS:].min() > 0.9, estimator


@pytest.mark.parametrize("coverage", [0.9, 0.95])
def test_dual_keeps_the_mass_of_rows_whose_mean_query_points_elsewhere(coverage):
    """Groups of rows in a block each attend their own block, all of them a sink: the block's mean query alone
    (pooled_q_mass) puts ~0.8 on the sink and keeps ~0.7 of the true mass; "dual" (its half from every row
    against the mean keys) keeps the asked mass with no more blocks than the oracle's (the failure pooled_q
    alone showed on Gemma-3's layer 5, head 1)."""
    q, k = diverse_rows()
    scale = E**-0.5
    m = true_block_mass(q, k, scale)
    st = settings("dual", coverage, window=1, sinks=1)
    kept, _, allowed = selection.select_blocks(q, k, scale=scale, causal=True, settings=st)
    rows = slice(4 * BS, None)
    assert kept_mass(kept, m)[..., rows].mean() >= coverage - 0.01
    oracle = oracle_kept(m, st)
    assert selection.block_density(kept, allowed) <= 1.05 * selection.block_density(oracle, allowed)
    QB = q.shape[2] // BS
    mean_query_only = by_rule(selection.pooled_q_mass(q, k, scale, True, torch.ones(QB, QB, dtype=torch.bool).tril(),
                                                      BS), st)
    assert kept_mass(mean_query_only, m)[..., rows].mean() < coverage - 0.15


@pytest.mark.parametrize("coverage", [0.9, 0.99])
def test_dual_keeps_the_asked_mass_with_fewer_blocks_than_pooled_on_graded_inputs(coverage):
    """Graded inputs where single keys carry much of the mass (harder for "dual" than the real layers: its half
    against the mean keys spreads their mass, so it keeps more than asked): "dual" keeps at least the asked mass,
    with at most 1.2x the blocks the oracle needs for the mass it keeps, and fewer blocks than "pooled", which
    keeps less than asked (0.82 of the mass at c=0.9 with 1.9x the oracle's blocks at that mass)."""
    q, k = graded()
    scale = E**-0.5
    m = true_block_mass(q, k, scale)
    found = {}
    for estimator in ("dual", "pooled"):
        st = settings(estimator, coverage, window=1, sinks=1)
        kept, _, allowed = selection.select_blocks(q, k, scale=scale, causal=True, settings=st)
        mass = float(kept_mass(kept, m).mean())
        oracle = oracle_kept(m, st._replace(coverage=min(mass, 1.0)))  # the oracle at the same mean mass
        found[estimator] = mass, selection.block_density(kept, allowed), selection.block_density(oracle, allowed)
    mass, density, oracle_density = found["dual"]
    assert mass >= coverage and density <= 1.2 * oracle_density, found
    assert density < found["pooled"][1] and found["pooled"][0] < coverage, found


# ----------------------------------------------------------------------------------------- compiled and eager


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compiled_selection_keeps_the_blocks_eager_keeps(estimator):
    """Every estimator traces whole (fullgraph: no data-dependent shape, no host sync; GQA, a ragged last block)
    and selects exactly what eager does; "dual" through Inductor (the others' Inductor runs are in test_adaptive's
    end-to-end tests; aot_eager here keeps this file fast)."""
    q, k, _ = spike_keys(L=960, H=4)
    q = q + 0.5 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    st = settings(estimator, 0.95, window=2, sinks=1)
    eager = selection.select(q, k, scale=E**-0.5, causal=True, settings=st)
    torch.compiler.reset()
    backend = "inductor" if estimator == "dual" else "aot_eager"
    compiled = torch.compile(selection.select, fullgraph=True, backend=backend)(q, k, scale=E**-0.5, causal=True,
                                                                                 settings=st)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b), estimator


def test_dual_end_to_end_matches_the_reference_and_its_option_is_checked():
    """The option reaches the compiled adaptive call (the report names it) and the output equals the dense
    reference of the same selection; an unknown estimator name is refused naming the option."""
    from test_adaptive import EXACT_TOL, CausalAttention, compile_adaptive, planted

    inputs = planted(H=2, L=2048)
    out, cap = compile_adaptive(CausalAttention(), inputs, coverage=0.95, max_density=1.0, window=1, sinks=0,
                                estimator="dual")
    (cand,) = cap.report.candidates
    assert cand.target == "adaptive" and "estimator=dual" in cand.info["adaptive"], cand.info
    st = SparseSettings(128, 0.95, 1.0, 0, 1, 0, estimator="dual")
    ref, density = selection.reference(*inputs, scale=32**-0.5, causal=True, settings=st)
    torch.testing.assert_close(out, ref, atol=EXACT_TOL, rtol=1e-4)
    assert density < 0.5, density
    with pytest.raises(ValueError, match="estimator='dual-rows'.*'dual'"):
        asam_compile.AsamConfig.from_options({"estimator": "dual-rows"})
