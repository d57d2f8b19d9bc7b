"""Smoke runs of the paper's experiments (a few iterations each): they run,
write their CSV and plot, and reject bad data directories clearly."""
import csv
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
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


def make_cifar_dir(root, images_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": gen.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                 "labels": gen.integers(0, 10, images_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def make_image_folder(root):
    from PIL import Image
    gen = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 2)):
        for label in ("n01", "n02"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = gen.integers(0, 256, (int(gen.integers(40, 90)), int(gen.integers(40, 90)), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg")


RESNET = ["examples/resnet_train.py", "--epochs", "1", "--batch-size", "4", "--workers", "0"]


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_resnet_training_on_local_data_and_resume(tmp_path, dataset):
    """The real loaders (CIFAR-10 pickles, an ImageFolder of JPEGs) on tiny
    generated data, one epoch, then --resume for a second."""
    data = tmp_path / "data"
    make_cifar_dir(data) if dataset == "cifar10" else make_image_folder(data)
    args = RESNET + ["--dataset", dataset, "--data", str(data), "--out", str(tmp_path)]
    if dataset == "imagenet":
        args += ["--subset", "0.8"]  # 4 of 5 images per class: 8 images, 2 batches
    first = run_example(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_example([*args[:2], "2", *args[3:], "--resume"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout
    rows = read_csv(tmp_path / f"resnet_{dataset}_adopt.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert (tmp_path / f"resnet_{dataset}_adopt.png").stat().st_size > 0


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_resnet_training_fake_data_mixed_precision(tmp_path, dataset):
    args = RESNET + ["--dataset", dataset, "--fake-data", "--fake-size", "8", "--image-size", "32",
                     "--precision", "fp16", "--optimizer", "adamw" if dataset == "imagenet" else "adopt",
                     "--out", str(tmp_path)]
    result = run_example(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch   1" in result.stdout


@pytest.mark.parametrize("dataset,layout,message", [
    ("cifar10", "missing", "Expected torchvision's layout"),
    ("cifar10", "malformed", "is not a CIFAR-10 python batch"),
    ("imagenet", "missing", "Expected torchvision's ImageFolder layout"),
])
def test_resnet_training_rejects_bad_data_directories(tmp_path, dataset, layout, message):
    data = tmp_path / "data"
    if layout == "malformed":
        folder = make_cifar_dir(data)
        (folder / "data_batch_3").write_bytes(b"not a pickle")
    result = run_example(RESNET + ["--dataset", dataset, "--data", str(data), "--out", str(tmp_path)], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and str(data) in result.stderr


def test_gpt_train_smoke(tmp_path):
    """Every run of the memory comparison, a few steps of a tiny model: CSV,
    summary (bytes per parameter as the formats promise) and plot."""
    result = run_example(["examples/gpt_train.py", "--steps", "6", "--eval-every", "3", "--eval-batches", "2",
                          "--dim", "64", "--layers", "1", "--heads", "2", "--context", "16", "--batch", "4",
                          "--corpus-chars", "50000", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "gpt_train.csv")
    runs = ["adopt_fp32_state", "adopt_bf16_state", "adopt_8bit_state", "adopt_bf16_8bit_master24", "adamw_fused"]
    assert [r["run"] for r in rows] == [name for name in runs for _ in range(2)]
    assert all(0 < float(r["val_loss"]) < 10 and 0 < float(r["train_loss"]) < 10 for r in rows)
    summary = {r["run"]: r for r in read_csv(tmp_path / "gpt_train_summary.csv")}
    per_param = {name: float(summary[name]["bytes_per_param"]) for name in runs}
    assert per_param["adopt_fp32_state"] == per_param["adamw_fused"] == 12.0
    assert per_param["adopt_bf16_state"] == 8.0
    # 8-bit state on the tensors of >= 4096 elements; the small ones keep float32 state
    assert 6.1 < per_param["adopt_8bit_state"] < 8.0
    assert abs(per_param["adopt_bf16_8bit_master24"] - (per_param["adopt_8bit_state"] - 1.0)) < 0.002
    assert float(summary["adopt_fp32_state"]["vs_fp32_state_pct"]) == 0.0
    assert (tmp_path / "gpt_train.png").stat().st_size > 0


def test_state_error_smoke(tmp_path):
    result = run_example(["examples/state_error.py", "--steps", "4", "--dim", "64", "--layers", "1",
                          "--context", "16", "--batch", "4", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["state"]: r for r in read_csv(tmp_path / "state_error.csv")}
    assert set(rows) == {"8-bit (ADOPT8bit)", "bf16, to nearest", "bf16, stochastic"}
    assert 0 < float(rows["8-bit (ADOPT8bit)"]["sqrt_v_median"]) < 0.05
    assert (tmp_path / "state_error.png").stat().st_size > 0
