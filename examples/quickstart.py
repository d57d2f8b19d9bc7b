"""Quickstart: train a small MLP on scikit-learn's handwritten digits (real
data, bundled, no download) with adopt_triton.ADOPT, and check it against the
authors' release (torch-adopt) trained from the same seed.

    python examples/quickstart.py [--epochs 20] [--lr 3e-3] [--device cuda]

On CUDA the update runs as the fused Triton kernel; on CPU as the compiled CPU
step (torch.compile's C++ backend; the eager path if no compiler is found).
"""
import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits

import adopt
from adopt_triton import ADOPT
from adopt_triton.dispatch import use_cpu_step, use_fused


def load_data(device):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(model, optimizer, train_set, epochs, batch_size, log):
    x, y = train_set
    gen = torch.Generator().manual_seed(1)  # the same batches for every optimizer
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        if log and (epoch == 0 or (epoch + 1) % 5 == 0):
            print(f"  epoch {epoch + 1:3d}  train loss {losses[-1]:.4f}")
    return losses


def accuracy(model, test_set):
    x, y = test_set
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    train_set, test_set = load_data(args.device)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(args.device)
    reference_model = copy.deepcopy(model)

    ours = ADOPT(model.parameters(), lr=args.lr, weight_decay=1e-4, decouple=True)
    first = next(model.parameters())
    path = "fused Triton kernel" if use_fused(None, first) else \
        "compiled CPU step" if use_cpu_step(None, first) else "eager path"
    print(f"adopt_triton.ADOPT on {args.device} ({path}), {args.epochs} epochs:")
    start = time.perf_counter()
    our_losses = train(model, ours, train_set, args.epochs, args.batch_size, log=True)
    print(f"  {time.perf_counter() - start:.1f} s, test accuracy {accuracy(model, test_set):.3f}")

    theirs = adopt.ADOPT(reference_model.parameters(), lr=args.lr, weight_decay=1e-4, decouple=True)
    their_losses = train(reference_model, theirs, train_set, args.epochs, args.batch_size, log=False)
    gap = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), reference_model.parameters()))
    loss_gap = max(abs(a - b) for a, b in zip(our_losses, their_losses))
    print(f"torch-adopt from the same seed: final loss {their_losses[-1]:.4f} vs ours {our_losses[-1]:.4f}; "
          f"largest loss difference {loss_gap:.2e}, largest parameter difference {gap:.2e}")
    if loss_gap > 1e-3:
        raise SystemExit("adopt_triton and torch-adopt disagree")


if __name__ == "__main__":
    main()
