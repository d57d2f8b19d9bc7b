"""``adopt_triton.ADOPT``: torch-adopt's optimizer class, run by a fused Triton kernel."""
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from adopt_triton import dispatch, fused as fused_path, quantize, state as state_format
from adopt_triton.clip import ClipEvaluator
from adopt_triton.common import Hyper, Scaling, Tensors, default_clip_lambda, flat_views
from adopt_triton.kernels import adopt as kernel
from adopt_triton.options import (EXECUTION_FLAGS, FLAG_DEFAULTS, STATE_DTYPES, PickledClip,
                                  check_hyperparameters, refuse_duplicates, step_count)
from adopt_triton.program import (COMPACT_KEYS, GroupProgram, OptimizerState, custom_clip, grads_of,
                                  has_grad)


class ADOPT(Optimizer):
    """ADOPT (Taniguchi et al., NeurIPS 2024), a drop-in for torch-adopt's ``adopt.ADOPT``.

    Same constructor, param-group keys, state (``step``, ``exp_avg``,
    ``exp_avg_sq``) and numbers as torch-adopt 0.1.0. Where ``fused``
    allows it, all tensors of a group that share a device and dtype are
    updated by one launch of one fused Triton kernel (one memory pass):

    * ``fused=None`` (default): the kernel for CUDA float32/bf16/fp16/complex64
      tensors, the compiled CPU step (``adopt_triton.cpu``, one pass, built
      by torch.compile's C++ backend) for CPU tensors of those dtypes, an
      eager path otherwise (``foreach``: True foreach, False the
      single-tensor reference ``adopt_triton.reference``, None each by size).
    * ``fused=True``: the kernel for every tensor, the compiled CPU step for
      CPU tensors (the kernel under Triton's interpreter, ``TRITON_INTERPRET=1``,
      as the test suite runs it); an error at construction for a tensor
      neither can take.
    * ``fused=False``: the eager paths; ``differentiable=True``: the
      single-tensor reference under autograd.

    ``clip_lambda(n)`` receives the tensor's step count before this step
    (1.0 on the first update) and returns the clip value; ``None`` disables
    clipping (the paper's Algorithm 1). Like torch-adopt, it is kept on the
    optimizer, not in ``state_dict``. The default ``n ** 0.25`` is computed in
    the kernel; any other callable is evaluated on the device on a float64
    tensor of step counts where it computes element-wise there, else once
    per distinct count on the host (as torch-adopt calls it), which reads
    the counts. It is never called for a first step.

    Beyond torch-adopt's signature (keyword-only): ``state_dtype`` (None:
    float32 for bf16/fp16 params, the param's dtype otherwise; or
    ``torch.bfloat16``, or ``torch.int8`` for 8-bit state),
    ``master_weight_bits`` (24 or 32, bf16 params), ``bf16_stochastic_round``
    and ``stochastic_round_seed``. See the README.
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
                 state_dtype: Optional[torch.dtype] = None, master_weight_bits: Optional[int] = None,
                 bf16_stochastic_round: bool = False, stochastic_round_seed: Optional[int] = None):
        if clip_lambda is not None and not callable(clip_lambda):
            raise ValueError(f"clip_lambda must be None or callable, got {clip_lambda!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (supported: None, torch.float32, "
                             "torch.bfloat16, torch.int8 for 8-bit state)")
        if master_weight_bits not in (None, *quantize.MASTER_WEIGHT_BITS):
            raise ValueError(f"Invalid master_weight_bits: {master_weight_bits} (supported: None, 24, 32)")
        # Like clip_lambda, these live on the optimizer, not in param_groups, so
        # that state_dict keeps torch-adopt's layout.
        self.state_dtype = state_dtype
        self.master_weight_bits = master_weight_bits
        self.bf16_stochastic_round = bf16_stochastic_round
        random = bf16_stochastic_round or state_dtype == torch.int8  # 8-bit sqrt(v) rounds stochastically
        if random and stochastic_round_seed is None:  # reproducible under torch.manual_seed
            stochastic_round_seed = int(torch.randint(2**31 - 1, ()))
        self.stochastic_round_seed = stochastic_round_seed if random else None
        if self.stochastic_round_seed is not None and not 0 <= self.stochastic_round_seed < kernel.SEED_LIMIT:
            raise ValueError(f"Invalid stochastic_round_seed: {stochastic_round_seed} (an integer in "
                             f"[0, 2**31))")
        if state_dtype == torch.bfloat16 and not bf16_stochastic_round and 1 - betas[1] < 2**-9:
            warnings.warn(
                f"state_dtype=torch.bfloat16 with beta2={betas[1]}: rounding to nearest, "
                "exp_avg_sq * beta2 rounds back to exp_avg_sq (bf16 keeps 8 bits), so v follows "
                "new gradients only when they move it by more than half a bf16 unit; "
                "bf16_stochastic_round=True keeps every update unbiased", stacklevel=2)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        check_hyperparameters(dict(defaults, params=[]))
        if capturable and custom_clip(clip_lambda) and \
                not ClipEvaluator(clip_lambda).takes_tensors(torch.device("cpu")):
            raise ValueError(
                "ADOPT(capturable=True): clip_lambda must compute element-wise on a tensor of step "
                "counts (e.g. lambda n: n ** 0.25 or lambda n: n.clamp(max=3.0)); this one only works "
                "on Python numbers, which would need a host read of the counts")
        self.clip_lambda = clip_lambda
        self._reset_caches()
        super().__init__(params, defaults)
        self.state = OptimizerState(self.state)
        self._register_hooks()

    def _register_hooks(self) -> None:
        if ADOPT._portable_state_dict not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(ADOPT._portable_state_dict)
            self.register_load_state_dict_pre_hook(ADOPT._keep_execution_flags)
            self.register_load_state_dict_post_hook(ADOPT._convert_loaded_state)

    # Pickles and deep copies carry the options (and the clip_lambda where it
    # pickles), not the cached programs, which hold raw addresses.
    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), state_dtype=self.state_dtype,
                    master_weight_bits=self.master_weight_bits,
                    bf16_stochastic_round=self.bf16_stochastic_round,
                    stochastic_round_seed=self.stochastic_round_seed,
                    clip_lambda=PickledClip(self.clip_lambda))

    def __setstate__(self, state: dict) -> None:
        clip = state.pop("clip_lambda", PickledClip(default_clip_lambda))
        super().__setstate__(state)
        self.clip_lambda = clip.clip_lambda if isinstance(clip, PickledClip) else clip
        self.state = OptimizerState(self.state)
        for name in ("state_dtype", "stochastic_round_seed", "master_weight_bits"):
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("bf16_stochastic_round", False)
        self._register_hooks()
        for group in self.param_groups:
            for key, value in FLAG_DEFAULTS.items():
                group.setdefault(key, value)
        self._reset_caches()
        ADOPT._place_steps(self)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # torch.optim raises its own error for a set
            param_group["params"] = list(params)
            refuse_duplicates(self.param_groups, param_group["params"])
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            check_hyperparameters(group)
            for param in group["params"]:
                state_format.check_options(self.state_dtype, self.master_weight_bits, group, param)
        except Exception:  # the group is refused whole, whatever the error
            self.param_groups.pop()
            raise

    def master_weight(self, param: Tensor) -> Tensor:
        """The float32 master weight of ``param``: the bf16 param joined with
        its remainder under ``master_weight_bits`` (exactly the param a float32
        run would hold, with 32 bits), else the param upcast."""
        return state_format.master_weight(param, self.state.get(param, {}))

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        """exp_avg/exp_avg_sq dtype: ``state_dtype`` if given, float32 for
        bf16/fp16 params, the param's dtype otherwise."""
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype

    @staticmethod
    def _portable_state_dict(optimizer: "ADOPT", state_dict: dict) -> dict:
        """Record ``fused=True`` as ``fused=None`` and ``capturable=True`` as
        ``False``: torch-adopt raises on ``fused=True`` and its capturable
        step asserts that params are on an accelerator, and a checkpoint
        should load there too, on any device. (Loading into
        ``adopt_triton.ADOPT`` keeps the loader's own flags anyway.) The
        stochastic-rounding seed rides along under its own key, which
        torch.optim loaders ignore."""
        for group in state_dict["param_groups"]:
            if group.get("fused"):
                group["fused"] = None
            if group.get("capturable"):
                group["capturable"] = False
        if optimizer.stochastic_round_seed is not None:
            state_dict["adopt_triton"] = {"stochastic_round_seed": optimizer.stochastic_round_seed}
        return state_dict

    @staticmethod
    def _keep_execution_flags(optimizer: "ADOPT", state_dict: dict) -> dict:
        """Keep this optimizer's foreach/fused/capturable/differentiable when
        loading a checkpoint (``Optimizer.load_state_dict`` would take the
        checkpoint's): they say how to run on this machine, not what was
        trained. Hyper-parameters and state come from the checkpoint. What
        torch would refuse is refused here first, so that a refused load
        changes nothing (the seed and converted state wait for the post-hook)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(saved["params"]) != len(group["params"])
               for saved, group in zip(saved_groups, optimizer.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                             "of optimizer's group")
        for index, saved in state_dict["state"].items():
            if "step" in saved:  # refused before anything is loaded
                step_count(saved["step"], f"the checkpoint's step of state {index}")
        groups = [dict(saved, **{key: group[key] for key in EXECUTION_FLAGS})
                  for saved, group in zip(state_dict["param_groups"], optimizer.param_groups)]
        # Keep the checkpoint's own state tensors for _convert_loaded_state:
        # Optimizer.load_state_dict casts them to the param dtype (lossy for a
        # float32 state of bf16 params).
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loaded = {p: state_dict["state"][i] for i, p in zip(saved_ids, params) if i in state_dict["state"]}
        optimizer._pending_load = (loaded, state_dict.get("adopt_triton", {}).get("stochastic_round_seed"))
        return dict(state_dict, param_groups=groups)

    @staticmethod
    def _convert_loaded_state(optimizer: "ADOPT") -> None:
        """A loaded state takes this optimizer's format (``state.converted``:
        float32 -> bf16 and float32 -> 8-bit round to nearest, bf16 ->
        float32 is exact, 8-bit -> float32 decodes), converted from the
        checkpoint's own tensors; step goes where it is read. The checkpoint's
        stochastic-rounding seed continues its random stream."""
        loaded, seed = optimizer.__dict__.pop("_pending_load", ({}, None))
        for param, saved in loaded.items():
            current = optimizer.state[param]
            for key in ("exp_avg", "exp_avg_sq", *COMPACT_KEYS):
                current.pop(key, None)
            current.update(state_format.converted(param, saved, optimizer._state_dtype(param),
                                                  optimizer.master_weight_bits))
        if seed is not None and optimizer.stochastic_round_seed is not None:
            optimizer.stochastic_round_seed = seed
        ADOPT._place_steps(optimizer)
        optimizer._reset_caches()

    @staticmethod
    def _place_steps(optimizer: "ADOPT") -> None:
        """Put every ``step`` where its path reads it, as a float32 scalar
        (checkpoints may bring it from elsewhere, or of another dtype)."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = step_count(state["step"], "a step count").to(
                        dispatch.step_device(ADOPT._fused(group), param))

    @staticmethod
    def _fused(group: dict) -> Optional[bool]:
        """The group's ``fused``, as its paths read it (differentiable runs eagerly)."""
        return False if group["differentiable"] else group["fused"]

    def _reset_caches(self) -> None:
        """Forget every cached step program (rebuilt at the next step)."""
        self._programs: Dict[int, GroupProgram] = {}
        self._traced_steps = fused_path.FusedSteps()
        self._traced_owner = fused_path.register(self._traced_steps)
        self._clip: Optional[ClipEvaluator] = None

    def _pack_steps(self, group: dict) -> None:
        """Keep the group's step counts, per device, as the 0-d views of one
        flat float32 array, so one op advances them all (a new array when
        params gained state, or a count was replaced or loaded)."""
        fused_flag = ADOPT._fused(group)
        by_device: Dict[torch.device, List[dict]] = {}
        for param in group["params"]:
            state = self.state.get(param)
            if state and "step" in state:
                by_device.setdefault(dispatch.step_device(fused_flag, param), []).append(state)
        for device, states in by_device.items():
            steps = [state["step"] for state in states]
            views = flat_views(steps)
            if views is not None and len(views) == 1:
                base, indices = views[0]
                if base.device == device and base.dtype == torch.float32 and \
                        indices == list(range(base.numel())):
                    continue
            flat = torch.stack([step_count(s, "a step count").to(device) for s in steps])
            for state, view in zip(states, flat.unbind(0)):
                state["step"] = view

    def _gather(self, group: dict, grads: List[Optional[Tensor]]) -> Tuple[List[bool], Tensors]:
        """The group's params that have a gradient, with their state (created
        on their first gradient), checked; nothing is updated here."""
        mask = has_grad(grads)
        params = [p for p, active in zip(group["params"], mask) if active]
        grads = [g for g in grads if g is not None]
        for param, grad in zip(params, grads):
            if grad.is_sparse:
                group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
                param_index = next(i for i, p in enumerate(group["params"]) if p is param)
                raise RuntimeError(
                    "ADOPT does not support sparse gradients (param_groups"
                    f"[{group_index}]['params'][{param_index}], shape {tuple(param.shape)})")
        for param in params:
            state = self.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(state_format.new_state(param, self._state_dtype(param), self.master_weight_bits))
        self._pack_steps(group)
        states = [self.state[p] for p in params]
        compact = [[s.get(key) for s in states] for key in COMPACT_KEYS]
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        tensors = Tensors(params, grads, [s["exp_avg"] for s in states],
                          [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                          *(column if any(t is not None for t in column) else None for column in compact),
                          keys=[index[id(p)] for p in params])  # its state_dict index: a stable random stream
        if group["differentiable"] and any(s.requires_grad for s in tensors.steps):
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        dispatch.check(tensors, ADOPT._fused(group))
        return mask, tensors

    def _program(self, group: dict) -> GroupProgram:
        """The group's cached step program if it still fits, else a new one."""
        grads = grads_of(group["params"])
        program = self._programs.get(id(group))
        if program is not None and program.group is group and \
                program.reuse(group["params"], grads, self.state):
            return program
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() \
                and any(p.is_cuda for p in group["params"]):
            raise RuntimeError(
                "ADOPT: the tensors changed (new parameters, gradients or state) while a CUDA "
                "graph is being captured, and the kernel's launch tables cannot be rebuilt "
                "during capture: run step() once on these exact tensors before capturing")
        mask, tensors = self._gather(group, grads)
        program = self._programs[id(group)] = GroupProgram(
            group, mask, tensors, fused=ADOPT._fused(group),
            foreach=False if group["differentiable"] else group["foreach"])
        return program

    def _clip_evaluator(self) -> Optional[ClipEvaluator]:
        """The custom clip_lambda, evaluated off the host where it can be (None
        for no clip or the default, which the kernel computes)."""
        if not custom_clip(self.clip_lambda):
            return None
        if self._clip is None or self._clip.clip_lambda is not self.clip_lambda:
            self._clip = ClipEvaluator(self.clip_lambda)
        return self._clip

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list,
                    exp_avg_sqs: list, state_steps: list, exp_avg_scales: Optional[list] = None,
                    exp_avg_sq_scales: Optional[list] = None, remainders: Optional[list] = None,
                    keys: Optional[list] = None) -> bool:
        """Collect the group's tensors that have a gradient (creating their
        state), check them, and return whether any is complex. The signature
        is torch.optim's, plus the columns of compact storage (None entries
        where a param has none): torch.compile runs it eagerly while tracing."""
        _, tensors = self._gather(group, grads_of(group["params"]))
        columns = (params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
                   remainders, keys)
        for column, values in zip(columns, tensors):
            if column is not None:
                column.extend([None] * len(tensors.params) if values is None else values)
        return any(p.is_complex() for p in tensors.params)

    def _traced_step(self) -> None:
        """step() under torch.compile: torch.optim's structure (``_init_group``,
        then the update), the fused launches as one opaque op per group."""
        work = []
        for group in self.param_groups:
            columns = [[] for _ in Tensors._fields]
            self._init_group(group, *columns)
            work.append((group, Tensors(*(None if all(t is None for t in column) and column else column
                                          for column in columns))))
        scaling = Scaling(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for slot, (group, tensors) in enumerate(work):
            if not tensors.params:
                continue
            hyper = Hyper.of_group(group, self.clip_lambda)
            positions = dispatch.fused_positions(ADOPT._fused(group), tensors.params)
            if len(positions) != len(tensors.params):
                raise RuntimeError("ADOPT under torch.compile runs the fused kernel only (CUDA "
                                   "tensors, or CPU tensors under TRITON_INTERPRET=1); use fused=True "
                                   "with tensors it supports")
            fused_path.traced_fused_adopt(tensors, hyper, scaling, self.stochastic_round_seed or 0,
                                          self.bf16_stochastic_round, self._traced_owner, slot)

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling and torch.cuda.is_available() \
                and torch.cuda.is_current_stream_capturing() \
                and not all(group["capturable"] for group in self.param_groups):
            raise RuntimeError("Attempting CUDA graph capture of step() for an instance of ADOPT "
                               "but param_groups' capturable is False.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if compiling:
            self._traced_step()
            return loss
        # Everything that can fail, for every group, before any update.
        programs = [self._program(group) for group in self.param_groups]
        clip = self._clip_evaluator()
        work = []
        for group, program in zip(self.param_groups, programs):
            hyper = Hyper.of_group(group, self.clip_lambda)
            work.append((program, hyper, program.prepare(hyper, clip, capturable=group["capturable"])))
        scaling = Scaling(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for program, hyper, prepared in work:
            with torch.set_grad_enabled(program.group["differentiable"]):
                program.run(prepared, hyper, scaling, self.stochastic_round_seed or 0,
                            self.bf16_stochastic_round)
        return loss


class ADOPT8bit(ADOPT):
    """``ADOPT`` with 8-bit state (``state_dtype=torch.int8``) by default:
    about 2.1 bytes of state per parameter instead of 8 (tensors of fewer
    than 4096 elements keep float32 state)."""

    def __init__(self, params, *args, state_dtype: Optional[torch.dtype] = torch.int8, **kwargs):
        super().__init__(params, *args, state_dtype=state_dtype, **kwargs)
