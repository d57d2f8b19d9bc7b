"""The benchmark code runs on the CPU (interpreter, tiny sizes) so it cannot
rot: step-time comparison, bandwidth sweep, rendering, labelled results."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(args, env, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result


def test_benchmarks_run_on_cpu_and_write_labelled_results(tmp_path):
    env = dict(os.environ, ADOPT_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1",
               ADOPT_BENCH_SETS="one_tensor_2^10,gpt2_124m_shaped,small_tensors_x1000")
    step_times = run(["-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                      "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
                      "--benchmark-warmup=off"], env)
    assert step_times.returncode == 0, step_times.stdout[-4000:] + step_times.stderr[-2000:]
    sweep = run(["bench/bandwidth.py"], env)
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-2000:]
    [results] = tmp_path.glob("cpu-smoke-*.json")
    data = json.loads(results.read_text())
    assert data["smoke"] and "not GPU results" in data["note"] and data["copy_bandwidth_gbps"] > 0
    assert {"device", "torch", "triton", "cuda", "command", "date"} <= data.keys()
    impls = json.loads(run(["-c", "import sys; sys.path.insert(0, 'bench'); import peers, json; "
                                  "print(json.dumps(list(peers.IMPLEMENTATIONS)))"], env).stdout)
    measured = {row["impl"] for row in data["rows"] if row["dtype"] == "float32"}
    for impl in impls:  # measured, or reported absent with a reason: never dropped
        assert impl in measured or data["absent"].get(impl), impl
    for dtype in ("float32", "bfloat16"):
        cases = {row["case"] for row in data["rows"] if row["impl"] == "adopt_triton_fused" and row["dtype"] == dtype}
        assert cases == {"one_tensor_2^10", "gpt2_124m_shaped", "small_tensors_x1000"}
    sweep_rows = [r for r in data["rows"] if r["case"] == "kernel_sweep"]
    assert {r["impl"] for r in sweep_rows} == {"adopt_triton_kernel_update", "adopt_triton_kernel_update_bf16",
                                               "adopt_triton_kernel_first_step"}
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
