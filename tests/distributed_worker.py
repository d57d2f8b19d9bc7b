"""Worker processes of tests/test_distributed.py (gloo, CPU tensors, the fused
kernel under Triton's interpreter, or the compiled CPU step). Each job trains the same small
transformer-like model and writes what the test compares to `out_dir`."""
import contextlib
import gc
import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors on gloo, also on a CUDA machine

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from adopt_triton import ADOPT  # noqa: E402

VOCAB, WIDTH, BATCH, SEQ = 37, 16, 8, 5
OPTIONS = dict(lr=1e-2, weight_decay=0.01, decouple=True, fused=True)


class TinyLM(torch.nn.Module):
    """Embeddings, pre-norm MLP blocks, a final norm and head, and a 1-wide
    linear whose shards are empty on the second rank."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(WIDTH), torch.nn.Linear(WIDTH, 3 * WIDTH),
                                torch.nn.GELU(), torch.nn.Linear(3 * WIDTH, WIDTH)) for _ in range(2))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)
        self.gate = torch.nn.Linear(WIDTH, 1)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h)) * torch.sigmoid(self.gate(h))


def make_model():
    torch.manual_seed(0)
    return TinyLM()


def batch(step, rank, world):
    """Rank `rank`'s share of the global batch of step `step`."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    share = tokens.chunk(world)[rank]
    return share[:, :-1], share[:, 1:]


def train(model, optimizer, steps, rank, world):
    for step in steps:
        inputs, targets = batch(step, rank, world)
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full_params(model):
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def shard(model, **options):
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def single_process(steps):
    """The reference: one process, the global batch (the mean of the ranks' losses)."""
    model = make_model()
    optimizer = ADOPT(model.parameters(), **OPTIONS)
    for step in range(steps):
        losses = []
        for rank in range(2):
            inputs, targets = batch(step, rank, 2)
            losses.append(torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
        optimizer.zero_grad()
        (sum(losses) / 2).backward()
        optimizer.step()
    return full_params(model)


@contextlib.contextmanager
def process_group(rank, world, port, backend="gloo", init=None):
    """The job's process group, torn down together: on success every rank
    waits for the others and frees the collectives' pending work before the
    group goes (a gloo rank that exits first, holding some, intermittently
    aborts in C++ at interpreter exit). On an error no barrier: the others
    may never reach it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    (init or dist.init_process_group)(backend, rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def fsdp_job(rank, world, port, out_dir, steps, name, options):
    with process_group(rank, world, port):
        model = shard(make_model())
        optimizer = ADOPT(model.parameters(), **dict(OPTIONS, **options))
        train(model, optimizer, range(steps), rank, world)
        state = next(iter(optimizer.state.values()))
        assert type(state["exp_avg"]).__name__ == "DTensor"  # state sharded like its param
        params = full_params(model)
        if rank == 0:
            torch.save(params, os.path.join(out_dir, f"fsdp_{name}.pt"))


def offload_job(rank, world, port, out_dir, steps, device="cpu"):
    """FSDP2 with CPUOffloadPolicy: the shards, gradients and optimizer state
    live on the CPU, and ADOPT's default (fused=None) runs the compiled CPU
    step on them. On a CPU mesh (gloo) the policy needs pin_memory=False
    (pinning needs an accelerator); on CUDA it is the real thing: forward and
    backward on the GPU, the step on the CPU."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    # collectives of CUDA tensors on NCCL, of the CPU shards on gloo
    with process_group(rank, world, port, "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"):
        model = shard(make_model(), offload_policy=CPUOffloadPolicy(pin_memory=device == "cuda"))
        optimizer = ADOPT(model.parameters(), **dict(OPTIONS, fused=None))
        for step in range(steps):
            inputs, targets = (t.to(device) for t in batch(step, rank, world))
            loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        program = optimizer._programs[id(optimizer.param_groups[0])]
        assert program.cpu is not None and not program.eager_positions  # the CPU step, no other path
        state = next(iter(optimizer.state.values()))
        assert state["exp_avg"].to_local().device.type == "cpu"
        params = {name: value.cpu() for name, value in full_params(model).items()}
        if rank == 0:
            torch.save(params, os.path.join(out_dir, f"offload_{device}.pt"))


def ddp_job(rank, world, port, out_dir, steps):
    with process_group(rank, world, port):
        model = DistributedDataParallel(make_model())
        optimizer = ADOPT(model.parameters(), **OPTIONS)
        train(model, optimizer, range(steps), rank, world)
        if rank == 0:
            torch.save(full_params(model.module), os.path.join(out_dir, "ddp.pt"))


def checkpoint_job(rank, world, port, out_dir, steps, save_at):
    """Uninterrupted FSDP run; then a run that saves a distributed checkpoint
    at `save_at`, and a fresh model and optimizer that load it and go on."""
    with process_group(rank, world, port):
        model, optimizer = sharded_model_and_optimizer()
        train(model, optimizer, range(steps), rank, world)
        straight = full_params(model)

        model, optimizer = sharded_model_and_optimizer()
        train(model, optimizer, range(save_at), rank, world)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(out_dir, "ckpt"))

        resumed = resumed_run(rank, world, out_dir, steps, save_at)
        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed}, os.path.join(out_dir, "dcp.pt"))


def sharded_model_and_optimizer():
    model = shard(make_model())
    return model, ADOPT(model.parameters(), **OPTIONS)


def resumed_run(rank, world, out_dir, steps, save_at):
    """A fresh sharded model and optimizer load the checkpoint and train on;
    their full params at the end."""
    model, optimizer = sharded_model_and_optimizer()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, optimizer, range(save_at, steps), rank, world)
    return full_params(model)


def reshard_job(rank, world, port, out_dir, steps, save_at):
    """Load the 2-rank checkpoint into `world` ranks and train on."""
    with process_group(rank, world, port):
        params = resumed_run(rank, world, out_dir, steps, save_at)
        if rank == 0:
            torch.save(params, os.path.join(out_dir, f"reshard{world}.pt"))


def deepspeed_job(rank, world, port, out_dir, steps, stage):
    """DeepSpeed ZeRO stage 1/2 with adopt_triton.ADOPT as the client
    optimizer: it updates DeepSpeed's flat fp32 partition of this rank."""
    import deepspeed
    with process_group(rank, world, port, init=lambda backend, **_: deepspeed.init_distributed(backend)):
        model = make_model()
        optimizer = ADOPT(model.parameters(), **OPTIONS)
        config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
                  "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
                  "steps_per_print": 10**6}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        flat = [p for group in optimizer.param_groups for p in group["params"]]
        assert len(flat) == 1 and flat[0].dim() == 1  # the flat partition, not the model's tensors
        for step in range(steps):
            inputs, targets = batch(step, rank, world)
            loss = torch.nn.functional.cross_entropy(engine(inputs).flatten(0, 1), targets.flatten())
            engine.backward(loss)
            engine.step()
        if rank == 0:
            torch.save(full_params(model), os.path.join(out_dir, f"zero{stage}.pt"))


def mixed_group_job(rank, world, port, out_dir):
    """A param group mixing DTensor and plain tensors: a clear error, nothing updated."""
    with process_group(rank, world, port):
        sharded = shard(make_model())
        plain = torch.nn.Linear(3, 3)
        optimizer = ADOPT(list(sharded.parameters()) + list(plain.parameters()), **OPTIONS)
        inputs, targets = batch(0, rank, world)
        loss = torch.nn.functional.cross_entropy(sharded(inputs).flatten(0, 1), targets.flatten())
        (loss + plain(torch.randn(2, 3)).sum()).backward()
        before = [p.detach().clone() for p in plain.parameters()]
        try:
            optimizer.step()
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))
        if rank == 0:
            torch.save({"message": message, "unchanged": unchanged}, os.path.join(out_dir, "mixed.pt"))
