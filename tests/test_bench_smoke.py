"""The benchmark code as a developer runs it (`pytest bench`, `python
bench/bandwidth.py` from the checkout), on the CPU: interpreter, tiny sizes,
results labelled as CPU numbers; and rendering, README included.
(bench/run_gpu.sh --rehearse, in tests/test_gpu_script.py, runs every
benchmark stage from an installed copy.)"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(args, env, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_benchmarks_run_on_cpu_and_write_labelled_results(tmp_path):
    env = dict(os.environ, ADOPT_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1",
               ADOPT_BENCH_SETS="one_tensor_2^10")
    step_times = run(["-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                      "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
                      "--benchmark-warmup=off"], env)
    assert step_times.returncode == 0, step_times.stdout[-4000:] + step_times.stderr[-2000:]
    # as bench/README.md says to run it: bench/common.py sets TRITON_INTERPRET itself
    sweep = run(["bench/bandwidth.py"], {k: v for k, v in env.items() if k != "TRITON_INTERPRET"})
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-2000:]
    [results] = tmp_path.glob("cpu-smoke-*.json")
    data = json.loads(results.read_text())
    assert data["smoke"] and "not GPU results" in data["note"] and data["copy_bandwidth_gbps"] > 0
    assert {"device", "torch", "triton", "cuda", "command", "date", "steps"} <= data.keys()
    names = json.loads(run(["-c", "import sys; sys.path.insert(0, 'bench'); import peers, bandwidth, json; "
                                  "print(json.dumps([list(peers.IMPLEMENTATIONS), list(bandwidth.MODES)]))"],
                           env).stdout.strip().splitlines()[-1])
    impls, modes = names
    measured = {row["impl"] for row in data["rows"] if row["dtype"] == "float32"}
    for impl in impls:  # measured, or reported absent with a reason: never dropped
        assert impl in measured or data["absent"].get(impl), impl
    for dtype in ("float32", "bfloat16"):
        assert any(r["impl"] == "adopt_triton_fused" and r["dtype"] == dtype and r["case"] == "one_tensor_2^10"
                   for r in data["rows"])
    sweep_rows = [r for r in data["rows"] if r["case"] == "kernel_sweep"]
    assert {r["impl"] for r in sweep_rows} == {f"adopt_triton_kernel_{mode}" for mode in modes}
    assert {"update", "update_bf16", "update_bf16_state", "update_bf16_state_stochastic", "first_step"} <= set(modes)
    for row in data["rows"]:
        assert row["ms"] > 0 and row["gbps"] > 0 and row["pct_of_copy_bw"] > 0
    render = run(["bench/render.py", str(results)], env)
    assert render.returncode == 0, render.stderr[-2000:]
    assert results.with_suffix(".png").stat().st_size > 0
    assert "CPU smoke run" in results.with_suffix(".md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    refused = run(["bench/render.py", str(results), "--readme", str(readme)], env)
    assert refused.returncode != 0 and "never go into the README" in refused.stderr


def gpu_row(case, impl, numel, ms, dtype="float32", bytes_per_element=28):
    gbps = numel * bytes_per_element / ms / 1e6
    return dict(case=case, impl=impl, dtype=dtype, numel=numel, n_tensors=1, bytes_per_element=bytes_per_element,
                ms=ms, gbps=gbps, pct_of_copy_bw=100 * gbps / 4000, peak_extra_mb=0.0)


def test_gpu_results_render_into_the_readme_as_a_summary(tmp_path):
    rows = [gpu_row("gpt2_124m", "adopt_triton_fused", 124_439_808, 0.9),
            gpu_row("gpt2_124m", "torch_adamw_fused", 124_439_808, 1.1),
            gpu_row("one_tensor_2^20", "timm_adopt", 2**20, 0.05),                 # not a headline set
            gpu_row("kernel_sweep", "adopt_triton_kernel_update", 2**26, 0.5),
            gpu_row("kernel_sweep", "adopt_triton_kernel_update", 2**28, 1.9),
            *[gpu_row("block_sweep", f"adopt_triton_kernel_update_block{b}_warps8", 2**26, ms)
              for b, ms in ((512, 0.61), (1024, 0.52), (2048, 0.50), (4096, 0.55))]]
    results = tmp_path / "nvidia-h200-2026-12-01.json"
    results.write_text(json.dumps(dict(
        device="NVIDIA H200", smoke=False, date="2026-12-01T10:00:00", torch="2.11.0+cu130", triton="3.6.0",
        cuda="13.0", command="bash bench/run_gpu.sh", note="", copy_bandwidth_gbps=4300.0, rows=rows,
        absent={"heavyball_adopt": "ModuleNotFoundError: No module named 'heavyball'"},
        headline_sets=["gpt2_124m", "llama_1b", "one_tensor_2^26", "small_tensors_x1000"])))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench-table:start -->\nold table\n<!-- bench-table:end -->\nafter\n")
    render = run(["bench/render.py", str(results), "--readme", str(readme)], dict(os.environ))
    assert render.returncode == 0, render.stderr[-2000:]
    text = readme.read_text()
    block = text.split("<!-- bench-table:start -->")[1].split("<!-- bench-table:end -->")[0]
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "NVIDIA H200" in block and "| gpt2_124m | float32 | adopt_triton_fused |" in block
    assert "timm_adopt" not in block  # the full table has it
    assert "| kernel_sweep | float32 | adopt_triton_kernel_update | 1 | 268,435,456 |" in block
    assert "block512_" not in block and "block2048_" in block  # the 3 fastest configurations
    assert "nvidia-h200-2026-12-01.md" in block and "heavyball_adopt" in block
    full = results.with_suffix(".md").read_text()
    assert full.count("\n| ") == len(rows) + 1  # the header and every row
