"""A small character-level GPT trained on the Python standard library's own
source files (every machine has them: no download), once per optimizer
configuration from one seed, to compare optimizer memory with quality:

- ``adopt_fp32_state``: ADOPT, float32 params and state (12 bytes per param)
- ``adopt_bf16_state``: float32 params, bf16 exp_avg/exp_avg_sq (8)
- ``adopt_8bit_state``: float32 params, 8-bit exp_avg/exp_avg_sq (~6.17: 6.125,
  plus the float32 state of tensors under 4096 elements)
- ``adopt_bf16_8bit_master24``: bf16 params, 8-bit state, 24-bit master
  weights (bf16 param + 8-bit remainder: ~5.17)
- ``adamw_fused``: ``torch.optim.AdamW(fused=True)``, the baseline users know (12)

    python examples/gpt_train.py                          # CPU defaults, all runs < 10 min
    python examples/gpt_train.py --device cuda --steps 5000 --layers 6 --dim 384 --context 256 --batch 64

Writes <out>/gpt_train.csv (train and validation loss per evaluation, per
run), <out>/gpt_train.png (the curves) and <out>/gpt_train_summary.csv
(bytes per parameter and final validation loss per run).
"""
import argparse
import csv
import math
import pathlib
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adopt_triton import ADOPT


# ---------------------------------------------------------------- the corpus
def corpus_text(max_chars: int) -> str:
    """The standard library's .py files (sorted paths, tests and vendored
    packages left out), concatenated up to ``max_chars`` characters."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__")
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class Corpus:
    """Characters as token ids (printable ASCII, newline; anything else is
    one shared id), split 90/10 into training and validation text."""

    def __init__(self, max_chars: int):
        text = corpus_text(max_chars)
        self.alphabet = ["\n"] + [chr(c) for c in range(32, 127)] + ["\0"]
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        unknown = len(self.alphabet) - 1
        ids = torch.tensor([index.get(ch, unknown) for ch in text], dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @staticmethod
    def batch(ids: torch.Tensor, batch: int, context: int, gen: torch.Generator, device):
        starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=gen)
        rows = starts[:, None] + torch.arange(context + 1)
        chunk = ids[rows].to(device)
        return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------- the model
class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, dim)
        self.positions = torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, ids, targets):
        return F.cross_entropy(self(ids).float().flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------ the runs
RUNS = {
    "adopt_fp32_state": dict(param_dtype=torch.float32, options={}),
    "adopt_bf16_state": dict(param_dtype=torch.float32,
                             options=dict(state_dtype=torch.bfloat16, bf16_stochastic_round=True)),
    "adopt_8bit_state": dict(param_dtype=torch.float32, options=dict(state_dtype=torch.int8)),
    "adopt_bf16_8bit_master24": dict(param_dtype=torch.bfloat16,
                                     options=dict(state_dtype=torch.int8, master_weight_bits=24)),
    "adamw_fused": dict(param_dtype=torch.float32, adamw=True, options={}),
}


def make_optimizer(name, model, args):
    run = RUNS[name]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=other, weight_decay=0.0)]
    if run.get("adamw"):
        return torch.optim.AdamW(groups, lr=args.lr, fused=True)
    return ADOPT(groups, lr=args.lr, decouple=True, stochastic_round_seed=args.seed, **run["options"])


def bytes_per_parameter(model, optimizer) -> float:
    """Param bytes plus optimizer state bytes (everything but step counts), per parameter."""
    params = list(model.parameters())
    state = sum(t.nbytes for p in params for key, t in optimizer.state[p].items()
                if torch.is_tensor(t) and key != "step")
    return (sum(p.nbytes for p in params) + state) / sum(p.numel() for p in params)


def learning_rate(step, args):
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, corpus, args):
    gen = torch.Generator().manual_seed(12345)  # the same batches at every evaluation, for every run
    model.eval()
    losses = [float(model.loss(*Corpus.batch(corpus.val, args.batch, args.context, gen, args.device)))
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def train(name, corpus, args):
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = GPT(corpus.vocab_size, args.context, args.dim, args.layers, args.heads).to(args.device)
    model = model.to(RUNS[name]["param_dtype"])
    optimizer = make_optimizer(name, model, args)
    gen = torch.Generator().manual_seed(args.seed)  # the same training batches for every run
    rows, interval, start = [], [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=name, mininterval=5, file=sys.stdout):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model.loss(*Corpus.batch(corpus.train, args.batch, args.context, gen, args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        interval.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rows.append(dict(run=name, step=step + 1, train_loss=sum(interval) / len(interval),
                             val_loss=validation_loss(model, corpus, args),
                             seconds=time.perf_counter() - start))
            interval = []
    return rows, bytes_per_parameter(model, optimizer), time.perf_counter() - start


def plot(rows, path):
    """Training and validation loss, and each run's validation loss relative
    to float32-state ADOPT's (the curves lie on top of each other)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(16, 4))
    reference = {r["step"]: r["val_loss"] for r in rows if r["run"] == "adopt_fp32_state"}
    for name in dict.fromkeys(r["run"] for r in rows):
        points = [r for r in rows if r["run"] == name]
        steps = [r["step"] for r in points]
        for axis, key in zip(axes, ("train_loss", "val_loss")):
            axis.plot(steps, [r[key] for r in points], label=name)
        if reference:
            axes[2].plot(steps, [100 * (r["val_loss"] / reference[r["step"]] - 1) for r in points], label=name)
    titles = ("training loss (mean over each interval)", "validation loss",
              "validation loss vs float32-state ADOPT (%)")
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats per character)")
    axes[1].sharey(axes[0])
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def read_rows(path):
    with open(path) as f:
        return [dict(r, step=int(r["step"]), train_loss=float(r["train_loss"]), val_loss=float(r["val_loss"]))
                for r in csv.DictReader(f)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="default: 500 on CPU, 5000 on CUDA")
    parser.add_argument("--layers", type=int, default=None, help="default: 4 on CPU, 6 on CUDA")
    parser.add_argument("--dim", type=int, default=None, help="default: 128 on CPU, 384 on CUDA")
    parser.add_argument("--heads", type=int, default=None, help="default: 4 on CPU, 6 on CUDA")
    parser.add_argument("--context", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 64 on CUDA")
    parser.add_argument("--corpus-chars", type=int, default=None, help="default: 2M on CPU, 20M on CUDA")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=None, help="default: steps / 20")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--out", default="examples/out")
    parser.add_argument("--replot", action="store_true", help="only redraw <out>/gpt_train.png from its CSV")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    defaults = dict(steps=(5000, 500), layers=(6, 4), dim=(384, 128), heads=(6, 4), context=(256, 64),
                    batch=(64, 32), corpus_chars=(20_000_000, 2_000_000))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    args.eval_every = args.eval_every or max(1, args.steps // 20)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(read_rows(out / "gpt_train.csv"), out / "gpt_train.png")
        return
    corpus = Corpus(args.corpus_chars)
    print(f"corpus: {len(corpus.train) + len(corpus.val)} characters of the Python {sys.version.split()[0]} "
          f"standard library, {corpus.vocab_size} symbols; {args.steps} steps of {args.batch} x {args.context}")
    rows, summary = [], []
    for name in names:
        run_rows, per_param, seconds = train(name, corpus, args)
        rows += run_rows
        summary.append(dict(run=name, bytes_per_param=round(per_param, 3), final_val_loss=run_rows[-1]["val_loss"],
                            seconds=round(seconds, 1)))
        print(f"{name:26s} {per_param:6.2f} B/param  final validation loss {run_rows[-1]['val_loss']:.4f}  "
              f"({seconds:.0f} s)")
    reference = next((s["final_val_loss"] for s in summary if s["run"] == "adopt_fp32_state"), None)
    for s in summary:
        s["vs_fp32_state_pct"] = None if reference is None else round(100 * (s["final_val_loss"] / reference - 1), 2)
    for path, table in ((out / "gpt_train.csv", rows), (out / "gpt_train_summary.csv", summary)):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    plot(rows, out / "gpt_train.png")
    print(f"wrote {out / 'gpt_train.csv'}, {out / 'gpt_train_summary.csv'}, {out / 'gpt_train.png'}")


if __name__ == "__main__":
    main()
