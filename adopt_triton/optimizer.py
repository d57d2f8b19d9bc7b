"""``adopt_triton.ADOPT``: torch-adopt's optimizer class, run by a fused Triton kernel."""
import warnings
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from adopt_triton import dispatch
from adopt_triton.reference import default_clip_lambda

_FLAG_DEFAULTS = dict(maximize=False, foreach=None, capturable=False, differentiable=False,
                      fused=None)
# How this process runs the update, as opposed to what is being trained.
_EXECUTION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _check_hyperparameters(group: dict) -> None:
    """The constructor's validation (SPEC.md), applied to every param group."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"Invalid epsilon value: {group['eps']}")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if group["fused"]:
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        for param in group["params"]:
            dispatch.check_fused_supported(param)
    if group["capturable"]:
        if group["differentiable"] or group["foreach"] or group["fused"] is False:
            raise ValueError("capturable=True runs on the fused kernel: it cannot be combined with "
                             "fused=False, foreach=True or differentiable=True")
        for param in group["params"]:
            reason = dispatch.eager_reason(group["fused"], param)
            if reason is not None:
                raise RuntimeError(f"ADOPT(capturable=True) needs the fused kernel for every "
                                   f"parameter: {reason}")


class ADOPT(Optimizer):
    """ADOPT (Taniguchi et al., NeurIPS 2024), a drop-in for torch-adopt's ``adopt.ADOPT``.

    Same constructor, param-group keys, state (``step``, ``exp_avg``,
    ``exp_avg_sq``) and numbers as torch-adopt 0.1.0. Where ``fused``
    allows it, all tensors of a group that share a device and dtype are
    updated by one launch of one fused Triton kernel (one memory pass):

    * ``fused=None`` (default): the kernel for CUDA float32/bf16/fp16/complex64
      tensors, an eager path otherwise (``foreach`` unless ``foreach=False``,
      then the single-tensor reference ``adopt_triton.reference``).
    * ``fused=True``: the kernel for every tensor; an error at construction
      for a tensor it cannot take. CPU tensors run it only under Triton's
      interpreter (``TRITON_INTERPRET=1``), as the test suite does.
    * ``fused=False``: the eager paths; ``differentiable=True``: the
      single-tensor reference under autograd.

    ``clip_lambda(n)`` receives the tensor's step count before this step
    (1.0 on the first update) and returns the clip value; ``None`` disables
    clipping (the paper's Algorithm 1). Like torch-adopt, it is kept on the
    optimizer, not in ``state_dict``. The default ``n ** 0.25`` is computed in
    the kernel; any other callable is evaluated on the device on a float32
    tensor of step counts (as torch-adopt's foreach path does).

    Beyond torch-adopt's signature (keyword-only): ``state_dtype`` (None:
    float32 for bf16/fp16 params, the param's dtype otherwise; or
    ``torch.bfloat16``), ``bf16_stochastic_round`` and
    ``stochastic_round_seed`` (fused kernel only). See the README.
    """

    # GradScaler hands this optimizer `grad_scale` and `found_inf` instead of
    # unscaling the gradients itself: the kernel unscales in registers and
    # skips the step on the device when found_inf is set.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.9999), eps: float = 1e-6,
                 clip_lambda: Optional[Callable[[float], float]] = default_clip_lambda,
                 weight_decay: float = 0.0, decouple: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 state_dtype: Optional[torch.dtype] = None, bf16_stochastic_round: bool = False,
                 stochastic_round_seed: Optional[int] = None):
        if clip_lambda is not None and not callable(clip_lambda):
            raise ValueError(f"clip_lambda must be None or callable, got {clip_lambda!r}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype} (supported: None, torch.float32, "
                             "torch.bfloat16)")
        # Like clip_lambda, these live on the optimizer, not in param_groups, so
        # that state_dict keeps torch-adopt's layout.
        self.state_dtype = state_dtype
        self.bf16_stochastic_round = bf16_stochastic_round
        if bf16_stochastic_round and stochastic_round_seed is None:  # reproducible under torch.manual_seed
            stochastic_round_seed = int(torch.randint(2**31 - 1, ()))
        self.stochastic_round_seed = stochastic_round_seed if bf16_stochastic_round else None
        if state_dtype == torch.bfloat16 and not bf16_stochastic_round and 1 - betas[1] < 2**-9:
            warnings.warn(
                f"state_dtype=torch.bfloat16 with beta2={betas[1]}: rounding to nearest, "
                "exp_avg_sq * beta2 rounds back to exp_avg_sq (bf16 keeps 8 bits), so v follows "
                "new gradients only when they move it by more than half a bf16 unit; "
                "bf16_stochastic_round=True keeps every update unbiased", stacklevel=2)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        _check_hyperparameters(dict(defaults, params=[]))
        self.clip_lambda = clip_lambda
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(ADOPT._portable_state_dict)
        self.register_load_state_dict_pre_hook(ADOPT._keep_execution_flags)
        self.register_load_state_dict_post_hook(ADOPT._convert_loaded_state)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            _check_hyperparameters(group)
            for param in group["params"]:
                if self.state_dtype is not None and param.is_complex():
                    raise ValueError(f"state_dtype={self.state_dtype} needs real parameters, got "
                                     f"{param.dtype}")
                reason = self.bf16_stochastic_round and dispatch.eager_reason(group["fused"], param)
                if reason:
                    raise RuntimeError("bf16_stochastic_round=True runs in the fused kernel, which "
                                       f"this parameter would not use: {reason}")
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        """exp_avg/exp_avg_sq dtype: ``state_dtype`` if given, float32 for
        bf16/fp16 params, the param's dtype otherwise."""
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in ("state_dtype", "stochastic_round_seed"):
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("bf16_stochastic_round", False)
        for group in self.param_groups:
            for key, value in _FLAG_DEFAULTS.items():
                group.setdefault(key, value)
        ADOPT._place_steps(self)

    @staticmethod
    def _portable_state_dict(optimizer: "ADOPT", state_dict: dict) -> dict:
        """Record ``fused=True`` as ``fused=None``: torch-adopt raises on
        ``fused=True``, and a checkpoint should load there too. (Loading into
        ``adopt_triton.ADOPT`` keeps the loader's own flags anyway.) The
        stochastic-rounding seed rides along under its own key, which
        torch.optim loaders ignore."""
        for group in state_dict["param_groups"]:
            if group.get("fused"):
                group["fused"] = None
        if optimizer.stochastic_round_seed is not None:
            state_dict["adopt_triton"] = {"stochastic_round_seed": optimizer.stochastic_round_seed}
        return state_dict

    @staticmethod
    def _keep_execution_flags(optimizer: "ADOPT", state_dict: dict) -> dict:
        """Keep this optimizer's foreach/fused/capturable/differentiable when
        loading a checkpoint (``Optimizer.load_state_dict`` would take the
        checkpoint's): they say how to run on this machine, not what was
        trained. Hyper-parameters and state come from the checkpoint."""
        groups = [dict(saved, **{key: group[key] for key in _EXECUTION_FLAGS})
                  for saved, group in zip(state_dict["param_groups"], optimizer.param_groups)]
        # Keep the checkpoint's own state tensors for _convert_loaded_state:
        # Optimizer.load_state_dict casts them to the param dtype (lossy for a
        # float32 state of bf16 params).
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer._loaded_state = {p: state_dict["state"][i] for i, p in zip(saved_ids, params)
                                   if i in state_dict["state"]}
        seed = state_dict.get("adopt_triton", {}).get("stochastic_round_seed")
        if seed is not None and optimizer.bf16_stochastic_round:
            optimizer.stochastic_round_seed = seed  # the resumed run continues the same random stream
        return dict(state_dict, param_groups=groups + state_dict["param_groups"][len(groups):])

    @staticmethod
    def _convert_loaded_state(optimizer: "ADOPT") -> None:
        """A loaded exp_avg/exp_avg_sq takes this optimizer's state dtype
        (float32 -> bf16 rounds to nearest even, bf16 -> float32 is exact),
        converted from the checkpoint's own tensor; step goes where it is read."""
        for param, saved in getattr(optimizer, "_loaded_state", {}).items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    optimizer.state[param][key] = saved[key].detach().to(
                        device=param.device, dtype=optimizer._state_dtype(param))
        optimizer._loaded_state = {}
        ADOPT._place_steps(optimizer)

    @staticmethod
    def _step_device(group: dict, param: Tensor) -> torch.device:
        """Where ``param``'s step count lives: on its device when the fused
        kernel updates it (the kernel reads it there, no host sync), else on
        the CPU (the eager path reads it on the host)."""
        fused = False if group["differentiable"] else group["fused"]
        return param.device if dispatch.use_fused(fused, param) else torch.device("cpu")

    @staticmethod
    def _place_steps(optimizer: "ADOPT") -> None:
        """Put every ``step`` where ``_step_device`` says, as a float32 scalar
        (checkpoints may bring it from elsewhere)."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().to(
                        ADOPT._step_device(group, param))

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list,
                    exp_avg_sqs: list, state_steps: list) -> bool:
        """Collect the group's tensors that have a gradient (creating their
        state), check them, and return whether any is complex. The signature
        is torch.optim's, which torch.compile runs eagerly while tracing."""
        has_complex = False
        for param_index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
                raise RuntimeError(
                    "ADOPT does not support sparse gradients (param_groups"
                    f"[{group_index}]['params'][{param_index}], shape {tuple(param.shape)})")
            state = self.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=ADOPT._step_device(group, param))
                dtype = self._state_dtype(param)
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype,
                                                       memory_format=torch.preserve_format)
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode")
            has_complex |= torch.is_complex(param)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        dispatch.check(params, grads, exp_avgs, exp_avg_sqs, group["fused"])
        return has_complex

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        if not torch.compiler.is_compiling() and torch.cuda.is_available() \
                and torch.cuda.is_current_stream_capturing() \
                and not all(group["capturable"] for group in self.param_groups):
            raise RuntimeError("Attempting CUDA graph capture of step() for an instance of ADOPT "
                               "but param_groups' capturable is False.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Gather (and check) every group before updating any.
        work = []
        for group in self.param_groups:
            tensors = ([], [], [], [], [])
            self._init_group(group, *tensors)
            work.append((group, tensors))
        for group, tensors in work:
            if not tensors[0]:
                continue
            beta1, beta2 = group["betas"]
            differentiable = group["differentiable"]  # autograd: the single-tensor reference
            with torch.set_grad_enabled(differentiable):
                dispatch.apply(*tensors, fused=False if differentiable else group["fused"],
                               foreach=False if differentiable else group["foreach"],
                               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                               clip_lambda=self.clip_lambda, weight_decay=group["weight_decay"],
                               decouple=group["decouple"], maximize=group["maximize"],
                               grad_scale=getattr(self, "grad_scale", None),
                               found_inf=getattr(self, "found_inf", None),
                               stochastic_round_seed=self.stochastic_round_seed)
        return loss
