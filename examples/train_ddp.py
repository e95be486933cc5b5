"""Train LoRA-FA adapters with DDP (or FSDP2) and a plain torch.optim.AdamW.

    torchrun --nproc_per_node=2 examples/train_ddp.py                 # CPU, gloo, DDP
    torchrun --nproc_per_node=2 examples/train_ddp.py --fsdp          # FSDP2 (fully_shard)
    torchrun --nproc_per_node=8 examples/train_ddp.py --device cuda   # GPUs, nccl
    python examples/train_ddp.py                                      # one process, no torchrun

A small causal language model (embedding, residual MLP blocks, output head) learns a synthetic
next-token task; LoRA-FA layers wrap the blocks' linear layers. Only the B matrices train; A and the
base weights stay frozen, and B's gradient carries the LoRA-FA correction, so AdamW needs nothing
special. ``--save-dir DIR`` writes a PEFT-format adapter (needs safetensors).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lorafa_ext  # noqa: E402,F401
from lorafa_ext.model import apply_lorafa, lorafa_layers, lorafa_parameters  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down_proj(nn.functional.gelu(self.up_proj(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=32, dim=64, hidden=256, layers=2, context=8):
        super().__init__()
        self.context = context
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(context * dim, dim)  # looks at the last `context` tokens
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):  # ids: (batch, context) -> logits of the next token
        h = self.mix(self.embed(ids).flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def synthetic_batch(step, rank, batch, vocab, context, device):
    """Next token = a fixed permutation of the last token: learnable, different data on every rank."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    return ids.to(device), perm[ids[:, -1]].to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--save-dir", default=None, help="write a PEFT adapter here at the end (rank 0)")
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))

    torch.manual_seed(0)  # the same base model and the same A on every rank
    model = TinyLM().to(device)
    apply_lorafa(model, ["mix", "up_proj", "down_proj"], r=args.r, lora_alpha=args.alpha,
                 lora_dropout=args.dropout)
    n_train = sum(p.numel() for p in lorafa_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())

    if distributed and args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for _, layer in list(lorafa_layers(model)):
            fully_shard(layer)
        fully_shard(model)
        train_model = model
    elif distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        train_model = model

    opt = torch.optim.AdamW(lorafa_parameters(model), lr=args.lr)
    if rank == 0:
        mode = ("FSDP2" if args.fsdp else "DDP") if distributed else "single process"
        print(f"{mode}, world size {world}, device {device.type}, backend {lorafa_ext.backend()}")
        print(f"trainable parameters: {n_train} of {n_all} ({100 * n_train / n_all:.2f}%)")
    model.train()
    for step in range(1, args.steps + 1):
        ids, target = synthetic_batch(step, rank, args.batch, model.vocab, model.context, device)
        loss = nn.functional.cross_entropy(train_model(ids), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # SUM (gloo has no AVG)
            loss /= world
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if args.save_dir:
        from lorafa_ext.peft_compat import save_adapter

        if args.fsdp and distributed:
            save_adapter(model, args.save_dir) if rank == 0 else _gather_only(model)
        elif rank == 0:
            save_adapter(model, args.save_dir)
        if rank == 0:
            print(f"adapter written to {args.save_dir}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _gather_only(model):
    """The other ranks' half of save_adapter under FSDP2: take part in gathering the shards."""
    for _, layer in lorafa_layers(model):
        for t in (layer.lora_A, layer.lora_B):
            if hasattr(t, "full_tensor"):
                t.full_tensor()


if __name__ == "__main__":
    main()
