"""The compiled CPU step (adopt_triton.cpu) against the eager reference, bit
for bit (0 ulp: the reference's float32 operations with its fmas explicit,
no other contraction, IEEE sqrt and division); compiled once per variant for
any size, offset, step count or learning rate; chosen for CPU tensors; the
eager path, with one warning, where torch.compile cannot build it.

Each variant costs one inductor compilation (seconds, cached on disk by
torch): the three hyper-parameter sets below cover every flag value."""
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from adopt_triton import ADOPT, Tensors, adopt, cpu
from harness import ReferenceRun, assert_matches_reference, assert_same_run, hyper, make_params, wide_grad

STEPS = 12
# (91, 97) takes a call of its own; channels_last (3, 5, 23, 29) with
# contiguous gradients goes through the bucket like the small ones.
SHAPES = [(1,), (17,), (0, 3), (4099,), (5, 7, 9), (91, 97), (3, 5, 23, 29)]
HYPERS = {
    "defaults": hyper(),
    "maximize_coupled_wd_custom_clip": hyper(maximize=True, weight_decay=0.05,
                                             clip_lambda=lambda n: 0.5 + 0.1 * n),
    "decoupled_wd_no_clip_beta1_zero": hyper(betas=(0.0, 0.99), weight_decay=0.05, decouple=True,
                                             clip_lambda=None),
}


def options(h):
    return dict(lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps, clip_lambda=h.clip_lambda,
                weight_decay=h.weight_decay, decouple=h.decouple, maximize=h.maximize)


def grads_with_specials(params, step):
    """Wide gradients; exact zeros in one tensor, NaN and +-Inf in another."""
    grads = [wide_grad(p.shape, dtype=p.dtype) for p in params]
    grads[4].view(-1)[step::7] = 0.0
    if step in (5, 9):
        specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=grads[3].dtype)
        grads[3][torch.randint(0, 4099, (6,))] = specials[torch.randint(0, 3, (6,))]
    return grads


def lockstep(h, dtype=torch.float32, state_dtype=None, shapes=SHAPES, **flags):
    """ADOPT on CPU tensors and the reference on copies, the same gradients,
    compared bit for bit after every step. Param 1 first gets a gradient at
    step 3 and param 3 skips step 7: their step counts differ from the rest."""
    params = make_params(shapes, dtype=dtype)
    if params[-1].dim() == 4:
        params[-1].data = params[-1].data.to(memory_format=torch.channels_last)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    ref = ReferenceRun(params, state_dtype or (torch.float32 if low_precision else None))
    opt = ADOPT(params, **options(h), state_dtype=state_dtype, **flags)
    for step in range(STEPS):
        active = [i for i in range(len(params)) if not (i == 1 and step < 3 or i == 3 and step == 7)]
        grads = grads_with_specials(params, step)
        for i, p in enumerate(params):
            p.grad = grads[i] if i in active else None
        opt.step()
        ref.step([grads[i] for i in active], h, active)
        started = [i for i, p in enumerate(params) if p in opt.state]
        assert_same_run([params[i] for i in started], [opt.state[params[i]] for i in started],
                        [ref.tensors.params[i] for i in started], [ref.state_of(i) for i in started],
                        f"step {step}")
    assert params[3].isnan().any()  # the specials reached the params
    return opt, params


def program_of(opt):
    return opt._programs[id(opt.param_groups[0])]


@pytest.mark.parametrize("h", HYPERS.values(), ids=HYPERS.keys())
def test_matches_the_reference_bitwise(h, launches):
    opt, params = lockstep(h)
    program = program_of(opt)
    assert program.eager_positions == [] and launches == []
    assert [[params[i].shape for i, *_ in entries] for _, entries in program.cpu.calls] == [[(91, 97)]]


def test_large_tensors_share_calls_bitwise():
    """Nine large tensors: eight in one call (cpu.SLOTS), one alone; each
    with its own step count and clip value, compiled once per arity."""
    shapes = [(8192 + 17 * k,) for k in range(7)] + [(97, 89), (8209,)]
    compiled = counters["stats"]["unique_graphs"]
    h = hyper(weight_decay=0.05, decouple=True, clip_lambda=lambda n: 0.5 + 0.1 * n)
    opt, params = lockstep(h, shapes=shapes)
    assert [len(entries) for _, entries in program_of(opt).cpu.calls] == [cpu.SLOTS, 1]
    assert counters["stats"]["unique_graphs"] <= compiled + 2


DTYPES = {"bf16_params": (torch.bfloat16, None), "bf16_state": (torch.float32, torch.bfloat16),
          "fp16_params": (torch.float16, None), "complex64": (torch.complex64, None)}


@pytest.mark.parametrize("dtype,state_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_other_dtypes_match_the_reference_bitwise(dtype, state_dtype):
    """Upcast to float32, updated, each store rounded once to nearest even."""
    h = hyper(betas=(0.9, 0.99), weight_decay=0.05, decouple=True)  # beta2 bf16 state can follow
    lockstep(h, dtype, state_dtype, shapes=[(5,), (33, 65), (0,), (4099,), (17, 19), (129, 67),
                                            (2, 3, 61, 37)])


def test_compiled_once_for_any_size_offset_step_count_and_lr():
    """New sizes (both paths, odd), views at storage offsets, step counts in
    a flat array or standalone, changing float and tensor learning rates,
    another param group: no new compilation after the first."""
    def step_all(opt, params, steps):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

    base = torch.randn(3 * 8209 + 11)
    first = [torch.nn.Parameter(base[1:8210]), torch.nn.Parameter(base[8210 + 7:])] + \
        make_params([(8192 + k,) for k in range(cpu.SLOTS)] + [(5,)], seed=2)
    opt = ADOPT(first, lr=1e-2)
    step_all(opt, first, 1)  # compiles one tensor per call, and SLOTS
    compiled = counters["stats"]["unique_graphs"]
    step_all(opt, first, 2)
    params = make_params([(8213,), (97, 101), (3,), (4095,), (2,), (12345,)] +
                         [(9000 + 101 * k,) for k in range(cpu.SLOTS)], seed=3)
    lr = torch.tensor(1e-2)
    opt = ADOPT([{"params": params[:3]}, {"params": params[3:], "lr": 3e-3, "betas": (0.5, 0.99)}], lr=lr)
    for k in range(4):
        lr.fill_(1e-2 / (k + 1))
        opt.param_groups[1]["lr"] = 1e-3 * (k + 1)
        step_all(opt, params, 1)
    tensors = Tensors(params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
                      [torch.zeros_like(p) for p in params], [torch.tensor(float(n % 6)) for n in range(len(params))])
    adopt(tensors, hyper(lr=0.1))
    assert counters["stats"]["unique_graphs"] == compiled


def test_gradients_that_require_grad_neither_recompile_nor_stop_a_step():
    """create_graph=True leaves gradients that require grad, in any pattern
    from step to step: the compiled step sees them detached (one graph per
    arity), and the run equals the reference."""
    shapes = [(8192 + k,) for k in range(2 * cpu.SLOTS)]
    params, reference = make_params(shapes, seed=4), make_params(shapes, seed=4)
    opt, ref = ADOPT(params, lr=1e-2), ADOPT(reference, lr=1e-2, fused=False, foreach=False)
    compiled = None
    for step in range(10):
        for k, (p, q) in enumerate(zip(params, reference)):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.clone().requires_grad_(bool((step * 2654435761 >> k) & 1))
        opt.step()
        ref.step()
        if step == 0:
            compiled = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled
    assert_same_run(params, [opt.state[p] for p in params], reference, [ref.state[q] for q in reference])


def test_cpu_tensors_take_the_cpu_step_unless_fused_false(launches, monkeypatch):
    used = []
    monkeypatch.setattr(cpu.CpuStep, "run", lambda self, *a: used.append("cpu") or True)
    for flags, expected in ((dict(), ["cpu"]), (dict(fused=False), [])):
        params = make_params([(5,), (9,)])
        opt = ADOPT(params, **flags)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert used == expected and launches == []
        used.clear()


def test_fused_true_on_cpu_without_the_interpreter_runs_the_cpu_step():
    code = ("import torch\nfrom adopt_triton import ADOPT, reference, Tensors\n"
            "from adopt_triton.common import Hyper\n"
            "p = torch.nn.Parameter(torch.randn(9001)); q = p.detach().clone()\n"
            "opt = ADOPT([p], fused=True, lr=0.1)\n"
            "m, v, n = torch.zeros(9001), torch.zeros(9001), torch.tensor(0.0)\n"
            "for _ in range(10):\n"
            "    p.grad = torch.randn(9001); opt.step()\n"
            "    reference.adopt(Tensors([q], [p.grad], [m], [v], [n]), Hyper(0.1, 0.9, 0.9999, 1e-6, 0.0, False, False))\n"
            "print('CPU', opt._programs[id(opt.param_groups[0])].cpu is not None, torch.equal(p, q))\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU True True" in out.stdout


def test_without_a_compiler_the_eager_path_runs_after_one_warning(monkeypatch):
    monkeypatch.setattr(cpu, "_COMPILED", {})
    monkeypatch.setattr(cpu, "_UNAVAILABLE", [])

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", no_compiler)
    h = hyper(weight_decay=0.05)
    params, eager_params = make_params([(17,), (9001,)]), make_params([(17,), (9001,)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = [ADOPT(params, **options(h)), ADOPT(eager_params, **options(h), fused=False)]
        for _ in range(STEPS):
            for p, q in zip(params, eager_params):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            for opt in opts:
                opt.step()
    messages = [str(w.message) for w in caught if "could not build the CPU step" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
        assert torch.equal(opts[0].state[p]["exp_avg_sq"], opts[1].state[q]["exp_avg_sq"])


def test_grad_scaler_found_inf_skips_and_grad_scale_unscales():
    """The compiled step divides by GradScaler's scale in float32 (the
    reference, on gradients unscaled in float32, gives the same bits) and
    leaves everything untouched, step counts included, when found_inf is set."""
    params = make_params([(17,), (9001,)])
    ref = ReferenceRun(params)
    opt = ADOPT(params, lr=1e-2)
    scale = torch.tensor(1024.0)
    for step in range(STEPS):
        grads = [wide_grad(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g * scale
        opt.grad_scale, opt.found_inf = scale, torch.tensor(float(step == 4))
        opt.step()
        if step != 4:
            ref.step(grads, hyper(lr=1e-2))
        assert_matches_reference(opt, params, ref, f"step {step}")
    assert float(opt.state[params[0]]["step"]) == STEPS - 1


@pytest.mark.parametrize("options", [dict(state_dtype=torch.int8), dict(master_weight_bits=24),
                                     dict(bf16_stochastic_round=True)],
                         ids=["8bit_state", "master_weights", "stochastic_rounding"])
def test_compact_storage_and_stochastic_rounding_take_the_reference(options):
    """What the CPU step does not store or round takes the reference, bit for
    bit as with fused=False, foreach=False; plain tensors of the group keep
    the CPU step (with stochastic rounding, every tensor takes the reference)."""
    shapes = [(4099,), (9001,), (17,)]
    params, eager_params = (make_params(shapes, dtype=torch.bfloat16, seed=4) for _ in range(2))
    opts = [ADOPT(params, lr=1e-2, stochastic_round_seed=5, **options),
            ADOPT(eager_params, lr=1e-2, stochastic_round_seed=5, fused=False, foreach=False, **options)]
    for _ in range(STEPS):
        for p, q in zip(params, eager_params):
            p.grad = wide_grad(p.shape, dtype=p.dtype)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
        for key, value in opts[1].state[q].items():
            assert torch.equal(opts[0].state[p][key], value), key
    expected = {"state_dtype": [2], "master_weight_bits": [], "bf16_stochastic_round": [0, 1, 2]}
    assert program_of(opts[0]).cpu_positions == expected[next(iter(options))]  # (17 elements: plain)


def test_cpu_bench_runs_and_renders_its_table(tmp_path):
    """bench/cpu_step.py on 1000 small tensors, one repeat, into a scratch
    results directory, and its README table from that file."""
    env = dict(os.environ, ADOPT_BENCH_RESULTS=str(tmp_path))
    bench = str(pathlib.Path(__file__).parents[1] / "bench" / "cpu_step.py")
    run = subprocess.run([sys.executable, bench, "--cases", "small_tensors_x1000",
                          "--dtypes", "float32", "--impls", "adopt_triton_cpu,torch_adamw_fused",
                          "--repeats", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = next(tmp_path.glob("cpu-step-*.json"))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- cpu-step-table:start -->\n<!-- cpu-step-table:end -->\nafter\n")
    render = subprocess.run([sys.executable, bench, "--readme", str(readme), str(results)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert render.returncode == 0, render.stderr[-3000:]
    text = readme.read_text()
    assert "| small_tensors_x1000 | float32 |" in text and text.startswith("before") and text.endswith("after\n")
