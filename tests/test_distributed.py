"""FSDP2 (DTensor shards), DDP and torch.distributed.checkpoint, with the
fused kernel under the interpreter: 2 CPU processes on gloo, against the same
model trained in one process."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import distributed_worker as worker

STEPS, SAVE_AT = 6, 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(job, world, *args):
    """Run `job` on `world` processes; a port taken between choosing and
    binding it (another run on this machine) gets one more try."""
    for attempt in range(2):
        try:
            return mp.spawn(job, args=(world, free_port(), *args), nprocs=world, join=True)
        except mp.ProcessRaisedException as error:
            if attempt or "address already in use" not in str(error).lower():
                raise


@pytest.fixture(scope="module")
def single_process_params():
    return worker.single_process(STEPS)


def assert_same_params(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}")


FSDP_PATHS = {"fused_kernel": dict(fused=True), "cpu_step": dict(fused=None),
              "eager_foreach": dict(fused=False), "single_tensor": dict(fused=False, foreach=False),
              "stochastic_rounding_reference": dict(fused=None, bf16_stochastic_round=True)}


@pytest.mark.parametrize("name", FSDP_PATHS)
def test_fsdp2_training_matches_one_process(tmp_path, single_process_params, name):
    spawn(worker.fsdp_job, 2, str(tmp_path), STEPS, name, FSDP_PATHS[name])
    assert_same_params(torch.load(tmp_path / f"fsdp_{name}.pt"), single_process_params)


def test_fsdp2_cpu_offload_policy_steps_on_the_cpu_shards(tmp_path, single_process_params):
    spawn(worker.offload_job, 2, str(tmp_path), STEPS)
    assert_same_params(torch.load(tmp_path / "offload_cpu.pt"), single_process_params)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp2_cpu_offload_policy_on_cuda(tmp_path, single_process_params):
    """The real offload: forward and backward on the GPU(s) (NCCL), pinned
    CPU shards, the compiled CPU step on them; against the one-process CPU run."""
    world = min(2, torch.cuda.device_count())
    spawn(worker.offload_job, world, str(tmp_path), STEPS, "cuda")
    assert_same_params(torch.load(tmp_path / "offload_cuda.pt"), single_process_params)


def test_ddp_training_matches_one_process(tmp_path, single_process_params):
    spawn(worker.ddp_job, 2, str(tmp_path), STEPS)
    assert_same_params(torch.load(tmp_path / "ddp.pt"), single_process_params)


def test_distributed_checkpoint_resume_and_reshard(tmp_path, single_process_params):
    """Save at step 3 with 2 ranks, load into a fresh sharded model and
    optimizer, continue: identical to the uninterrupted run. The same
    checkpoint loaded into 1 rank (DCP reshards) continues within tolerance."""
    spawn(worker.checkpoint_job, 2, str(tmp_path), STEPS, SAVE_AT)
    runs = torch.load(tmp_path / "dcp.pt")
    for name, value in runs["straight"].items():
        assert torch.equal(runs["resumed"][name], value), name
    spawn(worker.reshard_job, 1, str(tmp_path), STEPS, SAVE_AT)
    assert_same_params(torch.load(tmp_path / "reshard1.pt"), single_process_params)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_one_process(tmp_path, single_process_params, stage):
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extra; absent from e.g. a lent GPU image")
    spawn(worker.deepspeed_job, 2, str(tmp_path), STEPS, stage)
    assert_same_params(torch.load(tmp_path / f"zero{stage}.pt"), single_process_params)


def test_mixed_dtensor_and_plain_group_is_a_clear_error(tmp_path):
    spawn(worker.mixed_group_job, 2, str(tmp_path))
    result = torch.load(tmp_path / "mixed.pt")
    assert "mixes DTensor parameters" in result["message"] and result["unchanged"]
