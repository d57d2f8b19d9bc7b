"""Smoke runs of the paper's experiments (a few iterations each): they run,
write their CSV and plot, and reject bad data directories clearly."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, MASTER_PORT="29655"))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_toy_convex_smoke(tmp_path):
    result = run_example(["examples/toy_convex.py", "--steps", "60", "--seeds", "8", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "toy_convex.csv")
    assert {r["optimizer"] for r in rows} == {"Adam", "AMSGrad", "ADOPT (clip n^0.25)", "ADOPT (no clip)"}
    assert {(r["k"], r["beta2"]) for r in rows} == {(k, b) for k in ("10", "50") for b in ("0.1", "0.5", "0.999")}
    assert all(-1 <= float(r["mean"]) <= 1 for r in rows)  # projected onto [-1, 1]
    assert (tmp_path / "toy_convex.png").stat().st_size > 0


def test_mlp_classification_smoke(tmp_path):
    result = run_example(["examples/mlp_classification.py", "--iterations", "20", "--log-every", "10",
                          "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "mlp_digits.csv")
    assert {r["optimizer"] for r in rows} == {"Adam", "AMSGrad", "AdaShift", "ADOPT"}
    assert len(rows) == 4 * 4 * 2
    assert (tmp_path / "mlp_digits.png").stat().st_size > 0


@pytest.mark.parametrize("layout", ["missing", "malformed"])
def test_mlp_classification_rejects_a_bad_mnist_directory(tmp_path, layout):
    raw = tmp_path / "MNIST" / "raw"
    if layout == "malformed":
        raw.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            (raw / name).write_bytes(b"\x00\x00\x08")
    result = run_example(["examples/mlp_classification.py", "--mnist", str(tmp_path), "--iterations", "2"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(raw) in result.stderr
    assert ("Expected torchvision's layout" if layout == "missing" else "not a readable IDX file") in result.stderr


def test_fsdp_example_smoke(tmp_path):
    """One process (a world of one over gloo), save then resume."""
    checkpoint = tmp_path / "ckpt"
    first = run_example(["examples/fsdp_train.py", "--steps", "2", "--checkpoint-dir", str(checkpoint)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_example(["examples/fsdp_train.py", "--steps", "4", "--checkpoint-dir", str(checkpoint),
                           "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step     3" in resumed.stdout
