"""How far compact optimizer state drifts from float32 state on real
training gradients: the character-level GPT of gpt_train.py is trained
with float32-state ADOPT, and every step's gradients are also fed to
optimizers that keep their state compactly (shadows: their own params are
never used, and without weight decay their m and v depend on the gradients
alone). After the last step, the relative error |x - x_fp32| / |x_fp32| of
sqrt(v) and m over all elements of the quantised tensors (>= 4096
elements; x_fp32 != 0): median and 99th percentile.

    python examples/state_error.py                  # 1000 steps, CPU
    python examples/state_error.py --ablations      # also the 8-bit formats not chosen

Shadows: ``ADOPT8bit`` (the shipped format), bf16 state rounded to nearest
and stochastically; with ``--ablations``, emulations of other 8-bit formats
(block size, scale, m encoding, rounding of sqrt(v)) that the choice was
made against. Writes <out>/state_error.csv and <out>/state_error.png.
"""
import argparse
import csv
import pathlib
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpt_train import GPT, Corpus  # noqa: E402

from adopt_triton import ADOPT, ADOPT8bit, quantize  # noqa: E402

BETA1, BETA2, EPS = 0.9, 0.9999, 1e-6


class Emulated:
    """An 8-bit format that was not chosen, emulated in float32 torch ops:
    blocks of ``block`` elements; a float32 block maximum ("absmax") or a
    power-of-two scale ("pow2"); m linear or through the square-root
    compander ("sqrt"), to nearest; sqrt(v) linear, "stochastic" or "nearest"."""

    def __init__(self, name, params, block=64, scale="absmax", m_code="sqrt", v_rounding="stochastic"):
        self.name, self.block, self.scale, self.m_code, self.v_rounding = name, block, scale, m_code, v_rounding
        self.m = [torch.zeros_like(p) for p in params]
        self.root = [torch.zeros_like(p) for p in params]
        self.n = 0

    def _quantize(self, x, levels, companded=False, stochastic=False):
        flat = x.flatten()
        pad = (-flat.numel()) % self.block
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.block)
        top = blocks.abs().amax(1, keepdim=True)
        if self.scale == "pow2":  # the smallest power of two holding the block, a stable grid
            top = torch.exp2(torch.ceil(torch.log2(top.clamp(min=1e-30) * (levels + 1) / levels)))
            top = top * levels / (levels + 1)
        scaled = blocks / top.clamp(min=1e-30)
        if companded:
            scaled = scaled.sign() * scaled.abs().sqrt()
        scaled = scaled * levels
        codes = torch.floor(scaled + torch.rand_like(scaled)) if stochastic else torch.round(scaled)
        if not companded and levels == 255:  # sqrt(v): never a zero code for a nonzero value
            codes = torch.where((codes == 0) & (blocks > 0), 1.0, codes)
        codes = codes.clamp(-levels, levels) / levels
        if companded:
            codes = codes.sign() * codes * codes
        return (codes * top).flatten()[:flat.numel()].view(x.shape)

    def step(self, grads):
        for i, grad in enumerate(grads):
            if self.n == 0:
                self.root[i] = self._quantize(grad.abs(), 255, stochastic=self.v_rounding == "stochastic")
                continue
            update = (grad / self.root[i].clamp(min=EPS)).clamp(-self.n**0.25, self.n**0.25)
            m = self.m[i] + (1 - BETA1) * (update - self.m[i])
            self.m[i] = self._quantize(m, 127, companded=self.m_code == "sqrt")
            v = BETA2 * self.root[i] ** 2 + (1 - BETA2) * grad * grad
            self.root[i] = self._quantize(v.sqrt(), 255, stochastic=self.v_rounding == "stochastic")
        self.n += 1

    def moments(self):
        return self.root, self.m


class Shadow:
    """A real optimizer fed the run's gradients on copies of the params."""

    def __init__(self, name, params, make):
        self.name = name
        self.params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        self.optimizer = make(self.params)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.optimizer.step()

    def moments(self):
        roots, ms = [], []
        for p in self.params:
            state = self.optimizer.state[p]
            if "exp_avg_scale" in state:
                flat_m = quantize.decode_exp_avg(state["exp_avg"].reshape(-1), state["exp_avg_scale"])
                flat_root = quantize.decode_sqrt_exp_avg_sq(state["exp_avg_sq"].reshape(-1),
                                                            state["exp_avg_sq_scale"])
                ms.append(flat_m.view(p.shape))
                roots.append(flat_root.view(p.shape))
            else:
                ms.append(state["exp_avg"].float())
                roots.append(state["exp_avg_sq"].float().double().sqrt().float())
        return roots, ms


def relative_errors(values, reference):
    values = torch.cat([v.flatten() for v in values])
    reference = torch.cat([r.flatten() for r in reference])
    keep = reference != 0
    return ((values - reference).abs() / reference.abs())[keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is faster on a CPU shared with other jobs")
    parser.add_argument("--out", default="examples/out")
    parser.add_argument("--replot", action="store_true", help="only redraw <out>/state_error.png from its CSV")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        with open(pathlib.Path(args.out) / "state_error.csv") as f:
            rows = [{k: v if k == "state" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        plot(rows, pathlib.Path(args.out) / "state_error.png")
        return
    torch.manual_seed(args.seed)
    corpus = Corpus(2_000_000)
    model = GPT(corpus.vocab_size, args.context, args.dim, args.layers, 4)
    optimizer = ADOPT(model.parameters(), lr=args.lr, weight_decay=0.1, decouple=True)
    watched = [p for p in model.parameters() if p.numel() >= quantize.MIN_QUANT_NUMEL]
    shadows = [Shadow("float32 state", watched, lambda ps: ADOPT(ps, lr=args.lr, foreach=False)),
               Shadow("8-bit (ADOPT8bit)", watched, lambda ps: ADOPT8bit(ps, lr=args.lr, stochastic_round_seed=1)),
               Shadow("bf16, to nearest", watched, lambda ps: ADOPT(ps, lr=args.lr, state_dtype=torch.bfloat16)),
               Shadow("bf16, stochastic", watched, lambda ps: ADOPT(ps, lr=args.lr, state_dtype=torch.bfloat16,
                                                                    bf16_stochastic_round=True))]
    if args.ablations:
        shadows += [Emulated("8-bit, blocks of 32", watched, block=32),
                    Emulated("8-bit, blocks of 256", watched, block=256),
                    Emulated("8-bit, power-of-two scales", watched, scale="pow2"),
                    Emulated("8-bit, linear m", watched, m_code="linear"),
                    Emulated("8-bit, sqrt(v) to nearest", watched, v_rounding="nearest"),
                    Emulated("8-bit, as shipped (emulated)", watched)]
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="steps", mininterval=5, file=sys.stdout):
        loss = model.loss(*Corpus.batch(corpus.train, args.batch, args.context, gen, "cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        grads = [p.grad.detach() for p in watched]
        for shadow in shadows:
            shadow.step(grads)
    print(f"{args.steps} steps in {time.perf_counter() - start:.0f} s, final training loss {float(loss):.3f}; "
          f"{sum(p.numel() for p in watched)} elements in {len(watched)} tensors")
    reference_roots, reference_ms = shadows[0].moments()
    rows = []
    for shadow in shadows[1:]:
        roots, ms = shadow.moments()
        root_error, m_error = relative_errors(roots, reference_roots), relative_errors(ms, reference_ms)
        rows.append(dict(state=shadow.name, sqrt_v_median=float(root_error.median()),
                         sqrt_v_p99=float(root_error.double().quantile(0.99)),
                         m_median=float(m_error.median()), m_p99=float(m_error.double().quantile(0.99))))
    print("| state | sqrt(v) median | sqrt(v) p99 | m median | m p99 |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['state']} | {100 * row['sqrt_v_median']:.2f}% | {100 * row['sqrt_v_p99']:.1f}% | "
              f"{100 * row['m_median']:.2f}% | {100 * row['m_p99']:.0f}% |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "state_error.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "state_error.png")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    names = [r["state"] for r in rows][::-1]
    for axis, moment in zip(axes, ("sqrt_v", "m")):
        for offset, (stat, color) in enumerate((("median", "tab:blue"), ("p99", "tab:orange"))):
            values = [100 * r[f"{moment}_{stat}"] for r in rows][::-1]
            axis.barh([i + 0.4 * offset for i in range(len(rows))], values, height=0.4, color=color, label=stat)
        axis.set_xscale("log")
        axis.set_title(f"relative error of {'sqrt(v)' if moment == 'sqrt_v' else 'm'} vs float32 state (%)")
        axis.grid(alpha=0.3, axis="x")
    axes[0].set_yticks([i + 0.2 for i in range(len(rows))], names)
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
