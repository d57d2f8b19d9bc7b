"""Every implementation the benchmarks compare: ours, what a user would pick
instead, and AdamW as the ceiling a user already has (the same bytes per
element). A peer that cannot be imported is reported with the reason."""
from typing import Callable, Dict, Optional, Tuple

import torch

from adopt_triton import ADOPT, ADOPT8bit
from common import SMOKE


def _steady_state_update(params, exp_avgs, exp_avg_sqs, step, lr: float, beta1: float,
                         beta2: float, eps: float):
    """ADOPT's update (n >= 1, default clip) in the reference's ops, for torch.compile."""
    clip = step**0.25
    for param, exp_avg, exp_avg_sq in zip(params, exp_avgs, exp_avg_sqs):
        grad = param.grad
        update = (grad / exp_avg_sq.sqrt().clamp(min=eps)).clamp(-clip, clip)
        exp_avg.lerp_(update, 1 - beta1)
        param.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step += 1


class CompiledReference:
    """The reference's math under torch.compile (inductor on CUDA), from the
    second step on: what compiling the eager math buys without a hand kernel."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6):
        self.params = list(params)
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.rand_like(p) for p in self.params]
        self.count = torch.ones((), device=self.params[0].device)
        self.options = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps)
        torch._dynamo.reset()  # a fresh compilation per parameter set, not a recompile
        self.update = torch.compile(_steady_state_update, fullgraph=True,
                                    backend="eager" if SMOKE else "inductor")

    @torch.no_grad()
    def step(self):
        self.update(self.params, self.exp_avgs, self.exp_avg_sqs, self.count, **self.options)


def _torch_adopt(foreach):
    import adopt
    return lambda params: adopt.ADOPT(params, foreach=foreach)


def _timm():
    import timm.optim
    return lambda params: timm.optim.Adopt(params)


def _pytorch_optimizer():
    from pytorch_optimizer import ADOPT as PytorchOptimizerADOPT
    return PytorchOptimizerADOPT


def _heavyball():
    import heavyball
    return heavyball.ADOPT


# In the order of the benchmark runs: the headline first, those that compile
# for minutes last.
IMPLEMENTATIONS: Dict[str, Callable[[], Callable]] = {
    "adopt_triton_fused": lambda: lambda params: ADOPT(params, fused=True),
    "adopt_triton_fused_bf16_state": lambda: lambda params: ADOPT(
        params, fused=True, state_dtype=torch.bfloat16, bf16_stochastic_round=True),
    "adopt_triton_fused_8bit_state": lambda: lambda params: ADOPT8bit(params, fused=True),
    "torch_adopt_foreach": lambda: _torch_adopt(True),
    "torch_adamw_fused": lambda: lambda params: torch.optim.AdamW(params, fused=True),
    "torch_adamw_foreach": lambda: lambda params: torch.optim.AdamW(params, foreach=True),
    "adopt_triton_foreach": lambda: lambda params: ADOPT(params, fused=False, foreach=True),
    "adopt_triton_reference": lambda: lambda params: ADOPT(params, fused=False, foreach=False),
    "torch_adopt_single_tensor": lambda: _torch_adopt(False),
    "timm_adopt": _timm,
    "pytorch_optimizer_adopt": _pytorch_optimizer,
    "heavyball_adopt": _heavyball,
    "reference_torch_compile": lambda: CompiledReference,
}
# The headline comparison (bench/run_gpu.sh stage c): ours against what a user
# has (torch-adopt's default foreach path) and the same-bytes ceiling (AdamW).
HEADLINE = ("adopt_triton_fused", "adopt_triton_fused_bf16_state", "torch_adopt_foreach",
            "torch_adamw_fused", "torch_adamw_foreach")
# Minutes of compilation per parameter set on a GPU (HeavyBall's max-autotune,
# inductor for the compiled reference).
SLOW_TO_COMPILE = ("heavyball_adopt", "reference_torch_compile")


def load(name: str) -> Tuple[Optional[Callable], Optional[str]]:
    """(factory taking a param list, None), or (None, why it is absent)."""
    try:
        return IMPLEMENTATIONS[name](), None
    except Exception as error:  # an import failure of any kind makes the peer absent
        return None, f"{type(error).__name__}: {error}"
