"""Test set-up: the Triton kernels run on CPU tensors through Triton's
interpreter unless TRITON_INTERPRET=0 is set (on a CUDA machine, to test the
compiled kernels). This must happen before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and compiled (not interpreted) kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this process: CPU tensors through the
    interpreter, or CUDA tensors when the kernels are compiled."""
    from adopt_triton.kernels.adopt import INTERPRETED
    if INTERPRETED:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them on the CPU)")
    return "cuda"
