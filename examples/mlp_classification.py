"""The paper's MLP experiment (ADOPT, MNIST section): a one-hidden-layer MLP
(784 hidden units, ReLU), batch 48, lr alpha / sqrt(t) with alpha in
{1, 0.1, 0.01, 0.001}, weight decay 1e-4, trained with Adam, AMSGrad,
AdaShift and ADOPT; training loss and test accuracy.

    python examples/mlp_classification.py                        # digits, CPU, minutes
    python examples/mlp_classification.py --mnist ~/data --iterations 10000 --device cuda

With --mnist DIR, MNIST is read from DIR in torchvision's layout
(DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, optionally .gz).
Without it, the same protocol runs on scikit-learn's bundled handwritten
digits (8x8 images, real data, no download), split 80/20.

Writes <out>/mlp_<dataset>.csv (training loss averaged over each logging
interval, test accuracy) and <out>/mlp_<dataset>.png.
"""
import argparse
import collections
import csv
import gzip
import pathlib

import numpy as np
import torch
from tqdm import tqdm

from adopt_triton import ADOPT

ALPHAS = (1.0, 0.1, 0.01, 0.001)


class AdaShift(torch.optim.Optimizer):
    """AdaShift (Zhou et al., ICLR 2019), a baseline of the paper: the second
    moment is an EMA of the gradient from `keep` steps ago (decorrelating it
    from the current one), the first moment a beta1-weighted average of the
    last `keep` gradients. Element-wise (phi = identity); no update until
    `keep` gradients have been seen; v is bias-corrected."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), keep=10, eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, keep=keep, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            weights = beta1 ** torch.arange(group["keep"], dtype=torch.float64)
            weights = (weights / weights.sum()).tolist()  # newest gradient first
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state.update(queue=collections.deque(maxlen=group["keep"]), v=torch.zeros_like(p), t=0)
                state["queue"].appendleft(grad.clone())
                if len(state["queue"]) < group["keep"]:
                    continue
                state["t"] += 1
                oldest = state["queue"][-1]
                state["v"].mul_(beta2).addcmul_(oldest, oldest, value=1 - beta2)
                v_hat = state["v"] / (1 - beta2 ** state["t"])
                m = sum(w * g for w, g in zip(weights, state["queue"]))
                p.addcdiv_(m, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])


OPTIMIZERS = {
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4),
    "AMSGrad": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4,
                                                   amsgrad=True),
    "AdaShift": lambda params, lr: AdaShift(params, lr=lr, weight_decay=1e-4),
    "ADOPT": lambda params, lr: ADOPT(params, lr=lr, betas=(0.9, 0.9999), weight_decay=1e-4),
}


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(root):
    raw = pathlib.Path(root).expanduser() / "MNIST" / "raw"
    arrays = {}
    for split in ("train", "t10k"):
        for kind, idx in (("images", "idx3"), ("labels", "idx1")):
            name = f"{split}-{kind}-{idx}-ubyte"
            found = [p for p in (raw / name, raw / (name + ".gz")) if p.is_file()]
            if not found:
                raise SystemExit(f"MNIST file {raw / name}[.gz] not found. Expected torchvision's layout: "
                                 f"{raw}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]")
            try:
                arrays[split, kind] = _read_idx(found[0])
            except (OSError, ValueError, IndexError) as error:
                raise SystemExit(f"{found[0]} is not a readable IDX file: {error}") from error
    to_x = lambda a: torch.tensor(a.reshape(len(a), -1), dtype=torch.float32) / 255  # noqa: E731
    return ((to_x(arrays["train", "images"]), torch.tensor(arrays["train", "labels"], dtype=torch.long)),
            (to_x(arrays["t10k", "images"]), torch.tensor(arrays["t10k", "labels"], dtype=torch.long)))


def load_digits_split():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(name, alpha, data, iterations, device, log_every, seed):
    (x, y), (x_test, y_test) = [(a.to(device), b.to(device)) for a, b in data]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 784), torch.nn.ReLU(),
                                torch.nn.Linear(784, 10)).to(device)
    optimizer = OPTIMIZERS[name](model.parameters(), alpha)
    gen = torch.Generator().manual_seed(seed)
    rows, running = [], []
    for t in tqdm(range(1, iterations + 1), desc=f"{name} alpha={alpha}", mininterval=2, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = alpha / t**0.5
        batch = torch.randint(0, len(x), (48,), generator=gen).to(device)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running.append(loss.detach())
        if t % log_every == 0 or t == iterations:
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            rows.append(dict(optimizer=name, alpha=alpha, iteration=t,
                             train_loss=float(torch.stack(running).mean()), test_accuracy=accuracy))
            running = []
    return rows


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(2, len(ALPHAS), figsize=(4 * len(ALPHAS), 6), sharex=True, squeeze=False)
    for j, alpha in enumerate(ALPHAS):
        for name in OPTIMIZERS:
            points = [r for r in rows if r["optimizer"] == name and r["alpha"] == alpha]
            steps = [r["iteration"] for r in points]
            axes[0][j].plot(steps, [r["train_loss"] for r in points], label=name)
            axes[1][j].plot(steps, [r["test_accuracy"] for r in points], label=name)
        axes[0][j].set_title(f"alpha = {alpha}")
        axes[0][j].set_yscale("log")
        axes[1][j].set_xlabel("iteration")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", help="directory holding MNIST in torchvision's layout")
    parser.add_argument("--iterations", type=int, default=3000, help="the paper uses 10000")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out"))
    args = parser.parse_args()
    data = load_mnist(args.mnist) if args.mnist else load_digits_split()
    dataset = "mnist" if args.mnist else "digits"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tqdm(OPTIMIZERS, desc="optimizers"):
        for alpha in ALPHAS:
            rows += train(name, alpha, data, args.iterations, args.device, args.log_every, args.seed)
    csv_path, png_path = args.out / f"mlp_{dataset}.csv", args.out / f"mlp_{dataset}.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png_path, f"one-hidden-layer MLP on {dataset}, {args.iterations} iterations")
    print(f"final test accuracy after {args.iterations} iterations ({dataset}):")
    for name in OPTIMIZERS:
        finals = {r["alpha"]: r for r in rows if r["optimizer"] == name and r["iteration"] == args.iterations}
        print(f"  {name:9s} " + "  ".join(f"alpha={a}: acc {finals[a]['test_accuracy']:.3f} "
                                          f"loss {finals[a]['train_loss']:.3f}" for a in ALPHAS))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
