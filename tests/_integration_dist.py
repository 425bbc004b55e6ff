"""One rank of the distributed tests in tests/test_integration.py (run as a script, never collected by pytest).

    python tests/_integration_dist.py {ddp|fsdp2} RANK WORLD_SIZE PORT OUT_JSON

Builds a tiny two-block GPT (nanoGPT-style hand-written causal attention) with the same seed on every rank,
wraps it in DistributedDataParallel or FSDP2 (fully_shard per block and at the root), compiles it with
backend="asam" and runs one training step (forward, cross-entropy loss, backward, SGD step) and one more
forward; then does the same from the same initial weights compiled with plain torch.compile (Inductor). It
writes both runs' losses, statistics of the updated parameters and what asam rewrote to OUT_JSON.
The process group is gloo over 127.0.0.1 only, with a bounded timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

D, H, T, VOCAB = 32, 4, 12, 64


class Attention(nn.Module):
    def __init__(self, block_size: int = 16):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, L, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (C // H) ** 0.5)
        att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(B, L, C))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return x + self.attn(x)


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, targets):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def build_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own data: the gradients must be reduced
    ids = torch.randint(0, VOCAB, (2, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def wrap(model: nn.Module, kind: str, world: int) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older torch
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def param_stats(model: nn.Module) -> dict[str, list[float]]:
    """Per parameter: sum, sum of squares and the first values of the full (unsharded) tensor."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2: a DTensor sharded over the ranks
            t = t.full_tensor()
        t = t.double()
        out[name.removeprefix("module.")] = [t.sum().item(), (t * t).sum().item(), *t.flatten()[:4].tolist()]
    return out


def step(kind: str, rank: int, world: int, backend: str) -> dict:
    import torch._dynamo

    import asam_compile

    torch._dynamo.reset()
    start = time.perf_counter()
    model = wrap(build_model(), kind, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    compiled = torch.compile(model, backend=backend)
    ids, targets = batch(rank)
    with asam_compile.capture() as cap:
        loss = compiled(ids, targets)
        loss.backward()
    opt.step()
    opt.zero_grad()
    params = param_stats(model)  # before the next forward: FSDP2's parameters are sharded again here
    loss2 = compiled(ids, targets)  # the updated weights, through the same compiled model
    return {
        "loss": loss.item(),
        "loss_after_step": loss2.item(),
        "params": params,
        "n_rewritten": cap.n_rewritten,
        "n_candidates": sum(len(r.candidates) for r in cap.reports),
        "sites": [[c.module, c.status, c.target, c.info.get("is_causal")] for r in cap.reports for c in r.candidates],
        "failures": [f for r in cap.reports for f in r.failures],
        "inductor_fallback": [r.inductor_fallback for r in cap.reports if r.inductor_fallback],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str]) -> None:
    kind, rank, world, port, out_path = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=180),
    )
    try:
        result = {"asam": step(kind, rank, world, "asam"), "inductor": step(kind, rank, world, "inductor")}
        with open(out_path, "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
