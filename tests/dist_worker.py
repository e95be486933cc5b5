"""Helper of tests/test_distributed.py (not a test module): the model, the data and the training loop,
shared by the single-process reference (imported by the test) and the 2-process gloo run
(``python tests/dist_worker.py OUT_DIR PORT RANK`` once per rank, or without RANK to spawn both
ranks with torch.multiprocessing).

Each rank trains on its half of every global batch; the loss is a mean over the local rows, so the
gradient averaged by DDP / FSDP2 equals the single-process gradient of the full batch.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lorafa_ext  # noqa: E402,F401  (registers torch.ops.lorafa)
from lorafa_ext.model import apply_lorafa, lorafa_layers, lorafa_parameters  # noqa: E402

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 16
D_IN, D_HID, D_OUT = 12, 24, 6
LR = 1e-2


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, D_HID), nn.GELU(), nn.Linear(D_HID, D_HID), nn.GELU(), nn.Linear(D_HID, D_OUT)
    )
    apply_lorafa(model, ["0", "2", "4"], r=4, lora_alpha=8, rank_pattern={"2": 6}, correction=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero B so that every path of the adapter matters
        for p in lorafa_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batches():
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, rank: int = 0, world: int = 1):
    """Train with a plain AdamW; return the local losses."""
    opt = torch.optim.AdamW(list(lorafa_parameters(model)), lr=LR)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for x, y in batches():
        xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = nn.functional.mse_loss(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def final_b(model: nn.Module):
    """{layer name: B} as full local tensors (gathers FSDP2 shards: a collective)."""
    out = {}
    for name, layer in lorafa_layers(model):
        b = layer.lora_B.detach()
        if hasattr(b, "full_tensor"):
            b = b.full_tensor()
        out[name] = b.clone()
    return out


def _run(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        # ---- DDP
        model = build_model()
        ddp = DDP(model)
        result["ddp_losses"] = train(ddp, rank, WORLD)
        result["ddp_b"] = final_b(model)
        # ---- FSDP2: shard every LoRA-FA layer, then the root
        model = build_model()
        for _, layer in list(lorafa_layers(model)):
            fully_shard(layer)
        fully_shard(model)
        result["fsdp_losses"] = train(model, rank, WORLD)
        result["fsdp_b"] = final_b(model)
        result["fsdp_sharded"] = all(
            type(layer.lora_B).__name__ == "DTensor" for _, layer in lorafa_layers(model)
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv):
    """``dist_worker.py OUT_DIR PORT [RANK]``: one rank, or both ranks via torch.multiprocessing."""
    out_dir, port = argv[1], int(argv[2])
    if len(argv) > 3:
        _run(int(argv[3]), port, out_dir)
        return
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(port, out_dir), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(sys.argv)
