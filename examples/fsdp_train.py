"""FSDP2 training with adopt_triton.ADOPT: the one-line swap, and resumable
distributed checkpoints.

    torchrun --nproc_per_node=8 examples/fsdp_train.py --steps 200 --checkpoint-dir ckpt
    torchrun --nproc_per_node=8 examples/fsdp_train.py --steps 400 --checkpoint-dir ckpt --resume

One process per GPU on NCCL; with no GPU it runs on the CPU over gloo (the
fused kernel then needs TRITON_INTERPRET=1, set here, so this stays a demo of
the wiring, not of speed). The model is a small causal transformer on random
token data; swap in your own model and data loader. ADOPT's update is
element-wise, so each rank updates its own parameter shards (DTensors) with no
communication; its state is sharded like the parameters, and
torch.distributed.checkpoint saves and reloads it (with resharding, if the
number of ranks changes).
"""
import argparse
import os
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel on CPU tensors

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from adopt_triton import ADOPT  # noqa: E402  (was: from adopt import ADOPT)


class Block(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, h):
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).triu(1)
        x = self.norm1(h)
        h = h + self.attention(x, x, x, attn_mask=causal, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab, width, depth, heads, context):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-dir", help="save a distributed checkpoint here at the end")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint-dir first")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python examples/fsdp_train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyTransformer(args.vocab, args.width, args.depth, 4, args.context).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = ADOPT(model.parameters(), lr=args.lr, weight_decay=0.01, decouple=True)

    start_step = 0
    if args.resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=args.checkpoint_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {start_step}")

    started = time.perf_counter()
    for step in range(start_step, args.steps):
        gen = torch.Generator().manual_seed(step * world + rank)  # each rank its own data
        tokens = torch.randint(0, args.vocab, (args.batch_size, args.context + 1), generator=gen).to(device)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:.1f} s")

    if args.checkpoint_dir:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(args.steps)},
                 checkpoint_id=args.checkpoint_dir)
        if rank == 0:
            print(f"saved {args.checkpoint_dir} at step {args.steps}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
