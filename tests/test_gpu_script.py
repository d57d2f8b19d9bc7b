"""bench/run_gpu.sh --rehearse: the GPU script's stages on the CPU (the
kernels interpreted, tiny sizes), installed as on the lent image, so that the
one GPU call cannot fail on plumbing: every stage passes and writes its rows,
$OUT keeps at most 8 files, and a failed or time-boxed stage makes the run
fail while keeping what it measured."""
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

import numpy as np
import torch

from interpreter_fma_plugin import fma_float32

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("a", "b", "c", "e", "f1", "f2", "f3")


def rehearse(root, out, timeout=600, **env):
    """Run the script as CI and a user do: whichever python3 is first on PATH
    (this interpreter's), from another directory."""
    environment = dict(os.environ, OUT=str(out), **env)
    environment["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    for name in ("TRITON_INTERPRET", "ADOPT_GPU_STAGES", "ADOPT_GPU_STAGE_CAP_S", "ADOPT_GPU_BUDGET_S"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(["bash", str(root / "bench" / "run_gpu.sh"), "--rehearse"], cwd=out.parent,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def bench_names(tmp_path):
    """The names the bench code defines: headline sets and implementations, bandwidth modes."""
    code = ("import json, common, peers, bandwidth; print(json.dumps(dict(sets=common.headline_sets(), "
            "impls=list(peers.HEADLINE), all_impls=list(peers.IMPLEMENTATIONS), modes=list(bandwidth.MODES))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="1", ADOPT_BENCH_RESULTS=str(tmp_path)),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def logs(out):
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {pathlib.Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_rehearsal_runs_every_stage_from_the_installed_package(tmp_path):
    out = tmp_path / "out"
    result = rehearse(ROOT, out)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    [results] = out.glob("cpu-smoke-*.json")
    assert {"logs.tar.gz", "summary.txt", results.with_suffix(".md").name, results.with_suffix(".png").name,
            "adopt-kernel-bandwidth.png"} <= set(files)
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert re.search(rf"^stage {stage} \(.*\): ok, \d+ s$", summary, re.M), (stage, summary)
    assert "FAILED" not in summary and "CUT" not in summary and "not run" not in summary, summary

    data = json.loads(results.read_text())
    # Imported from the target directory the script installed into, never the source tree.
    assert data["smoke"] and data["adopt_triton"].endswith("/site/adopt_triton"), data["adopt_triton"]
    assert data["command"] == "bash bench/run_gpu.sh --rehearse"
    names = bench_names(tmp_path)
    rows = data["rows"]
    measured = {(r["case"], r["impl"], r["dtype"]) for r in rows}
    for mode in names["modes"]:  # (b) every kernel variant
        assert any(case == "kernel_sweep" and impl == f"adopt_triton_kernel_{mode}" for case, impl, _ in measured), mode
    for impl in names["impls"]:  # (c) the headline: every set, both dtypes, or absent with a reason
        for case in names["sets"]:
            for dtype in ("float32", "bfloat16"):
                assert (case, impl, dtype) in measured or data["absent"].get(impl), (case, impl, dtype)
    block_sweep = [r for r in rows if r["case"] == "block_sweep"]  # (e)
    assert len({r["impl"] for r in block_sweep}) >= 4
    rest = {impl for _, impl, _ in measured} - set(names["impls"])  # (f2) the remaining peers
    for impl in set(names["all_impls"]) - set(names["impls"]):
        assert impl in rest or data["absent"].get(impl), impl
    if (ROOT / "bench" / "host_overhead.py").exists():  # (d): its rows, in the same file
        assert data.get("host_overhead", {}).get("rows") or any(r["case"].startswith("host_overhead") for r in rows)
        assert re.search(r"^stage d \(.*\): ok, \d+ s$", summary, re.M), summary
    else:
        assert "bench/host_overhead.py is not in this tree yet" in summary
    for row in rows:
        assert row["ms"] > 0, row

    log_files = logs(out)
    for name in ("setup.log", "device.txt", "summary.txt", "a.log", "b.log", "c.log", "e.log", "f1.log"):
        assert name in log_files, sorted(log_files)
    # (a) the kernel tests really ran, from the installed package, and passed;
    # (f1) collects every other kernel test (the suite itself runs them).
    suite = ElementTree.parse(io.BytesIO(log_files["a.xml"])).getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests - skipped > 20 and suite.get("failures") == "0" and suite.get("errors") == "0"
    collected = re.search(rb"(\d+)/\d+ tests collected", log_files["f1.log"])
    assert collected and int(collected.group(1)) > 20, log_files["f1.log"][-2000:]


STUB = '''import os, sys, time
import common
common.record([dict(case="host_overhead_stub", impl="stub", dtype="float32", numel=1, n_tensors=1,
                    bytes_per_element=28, ms=1.0, gbps=1.0, pct_of_copy_bw=1.0, peak_extra_mb=None)])
print("stub row recorded", flush=True)
if os.environ.get("STUB_EXIT"):
    sys.exit(int(os.environ["STUB_EXIT"]))
time.sleep(600)
'''


def test_a_failed_or_cut_stage_fails_the_run_and_keeps_its_results(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".whl", "results", "out"))
    (copy / "bench" / "host_overhead.py").write_text(STUB)

    out = tmp_path / "cut"
    out.mkdir()
    cut = rehearse(copy, out, ADOPT_GPU_STAGES="d", ADOPT_GPU_STAGE_CAP_S="20")
    assert cut.returncode == 1, cut.stdout[-4000:] + cut.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "stage d (host overhead of step()): CUT by its 20 s time box" in summary, summary
    assert "failed or cut: d" in summary
    [results] = out.glob("cpu-smoke-*.json")
    assert [r["case"] for r in json.loads(results.read_text())["rows"]] == ["host_overhead_stub"]
    assert b"stub row recorded" in logs(out)["d.log"]

    out = tmp_path / "failed"
    out.mkdir()
    failed = rehearse(copy, out, ADOPT_GPU_STAGES="d", STUB_EXIT="3")
    assert failed.returncode == 1, failed.stdout[-4000:] + failed.stderr[-2000:]
    assert "stage d (host overhead of step()): FAILED (exit 3)" in (out / "summary.txt").read_text()


def test_interpreter_fma_plugin_rounds_once():
    """The fma that tests/interpreter_fma_plugin.py gives Triton 3.6's
    interpreter: equal to ATen's CPU fma (addcmul with value 1), also where
    rounding the exact result to float64 first would round it wrongly."""
    gen = np.random.default_rng(0)
    x, y, z = [(gen.standard_normal(200_000) * np.exp(gen.standard_normal(200_000) * 8)).astype(np.float32)
               for _ in range(3)]
    aten = torch.addcmul(torch.from_numpy(z), torch.from_numpy(x), torch.from_numpy(y)).numpy()
    assert np.array_equal(fma_float32(x, y, z).view(np.int32), aten.view(np.int32))
    # x * y + z = 1 + 2**-23 + 2**-24 - 2**-70: just under a float32 midpoint, which
    # float64 rounds onto (then to even: 1 + 2**-22); once rounded it is 1 + 2**-23.
    x, y, z = np.float32(2**-24 * (1 + 2**-23)), np.float32(1 - 2**-23), np.float32(1 + 2**-23)
    assert np.float32(np.float64(x) * np.float64(y) + np.float64(z)) == np.float32(1 + 2**-22)
    assert fma_float32(x, y, z) == z
    assert np.isnan(fma_float32(np.float32(np.inf), np.float32(0), np.float32(1)))
    assert fma_float32(np.float32(3e38), np.float32(2), np.float32(-3e38)) == np.float32(3e38)
