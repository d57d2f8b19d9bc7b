"""The paper's toy problem (ADOPT, Fig. 1): where Adam fails and ADOPT does not.

    f_t(theta) = k^2 * theta  with probability 1/k,  else  -k * theta,  theta in [-1, 1]

The expected gradient is +1, so the optimum is theta = -1; but the rare large
gradient makes Adam with a small beta2 drift to the wrong end. Adam, AMSGrad
and ADOPT (clipped, as released, and unclipped) run for k in {10, 50} and
beta2 in {0.1, 0.5, 0.999}, beta1 = 0.9, lr_t = 0.01 / sqrt(1 + 0.01 t), each
on many seeds at once: one tensor of seeds per (k, beta2), one param group each,
so one optimizer step advances every seed of every setting.

    python examples/toy_convex.py                     # CPU, a few minutes
    python examples/toy_convex.py --steps 1000000 --seeds 1000 --device cuda

Writes <out>/toy_convex.csv (mean and std of theta over seeds, at
log-spaced steps) and <out>/toy_convex.png (theta against step, one panel per
k and beta2).
"""
import argparse
import csv
import math
import pathlib

import torch
from tqdm import tqdm

from adopt_triton import ADOPT

KS = (10, 50)
BETA2S = (0.1, 0.5, 0.999)
OPTIMIZERS = {
    "Adam": lambda groups: torch.optim.Adam(groups, betas=(0.9, 0.999)),
    "AMSGrad": lambda groups: torch.optim.Adam(groups, betas=(0.9, 0.999), amsgrad=True),
    "ADOPT (clip n^0.25)": lambda groups: ADOPT(groups, betas=(0.9, 0.999)),
    "ADOPT (no clip)": lambda groups: ADOPT(groups, betas=(0.9, 0.999), clip_lambda=None),
}


def run(name, steps, seeds, device, log_steps, seed):
    """theta's mean and std over seeds at `log_steps`, for every (k, beta2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    settings = [(k, beta2) for k in KS for beta2 in BETA2S]
    thetas = [torch.zeros(seeds, device=device, requires_grad=True) for _ in settings]
    optimizer = OPTIMIZERS[name]([{"params": [theta], "betas": (0.9, beta2), "lr": 0.01}
                                  for theta, (_, beta2) in zip(thetas, settings)])
    history = {setting: [] for setting in settings}
    wanted = set(log_steps)
    for t in tqdm(range(1, steps + 1), desc=name, mininterval=2, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 / math.sqrt(1 + 0.01 * t)
        for theta, (k, _) in zip(thetas, settings):
            rare = torch.rand(seeds, device=device, generator=gen) < 1 / k
            theta.grad = torch.where(rare, float(k * k), float(-k))
        optimizer.step()
        with torch.no_grad():
            for theta in thetas:
                theta.clamp_(-1, 1)  # the projection onto [-1, 1]
        if t in wanted:
            for theta, setting in zip(thetas, settings):
                history[setting].append((t, float(theta.mean()), float(theta.std())))
    return history


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(len(KS), len(BETA2S), figsize=(4 * len(BETA2S), 3.2 * len(KS)),
                                sharex=True, sharey=True, squeeze=False)
    for (i, k), (j, beta2) in ((a, b) for a in enumerate(KS) for b in enumerate(BETA2S)):
        axis = axes[i][j]
        for name in OPTIMIZERS:
            points = [r for r in rows if r["optimizer"] == name and r["k"] == k and r["beta2"] == beta2]
            steps = [r["step"] for r in points]
            mean = torch.tensor([r["mean"] for r in points])
            std = torch.tensor([r["std"] for r in points])
            axis.plot(steps, mean, label=name)
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
        axis.axhline(-1, color="gray", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_title(f"k = {k}, beta2 = {beta2}")
        axis.set_ylim(-1.05, 1.05)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("theta (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=256, help="independent runs per setting")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_steps = sorted({min(args.steps, round(10 ** (e / 10))) for e in range(0, 10 * math.ceil(math.log10(args.steps)) + 1)})
    rows = []
    for name in tqdm(OPTIMIZERS, desc="optimizers"):
        for (k, beta2), points in run(name, args.steps, args.seeds, args.device, log_steps, args.seed).items():
            rows += [dict(optimizer=name, k=k, beta2=beta2, step=t, mean=m, std=s) for t, m, s in points]
    with open(args.out / "toy_convex.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "toy_convex.png")
    print(f"final theta (mean over {args.seeds} seeds) after {args.steps} steps; the optimum is -1:")
    for name in OPTIMIZERS:
        finals = {(r["k"], r["beta2"]): r["mean"] for r in rows if r["optimizer"] == name and r["step"] == args.steps}
        print(f"  {name:20s} " + "  ".join(f"k={k} b2={b}: {v:+.3f}" for (k, b), v in sorted(finals.items())))
    print(f"wrote {args.out / 'toy_convex.csv'} and {args.out / 'toy_convex.png'}")


if __name__ == "__main__":
    main()
