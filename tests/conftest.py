"""Test set-up: the Triton kernels run on CPU tensors through Triton's
interpreter unless TRITON_INTERPRET=0 is set (on a CUDA machine, to test the
compiled kernels). This must happen before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and compiled (not interpreted) kernels")
    config.addinivalue_line("markers", "kernel: runs the Triton kernel on `kernel_device` (the CPU "
                                       "interpreter, or CUDA with compiled kernels); set automatically")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel)


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


@pytest.fixture
def launches(monkeypatch):
    """Records each launch of the fused kernel as the tuple of its tensors' sizes."""
    from adopt_triton.kernels import adopt as kernel
    calls = []
    launch = kernel.launch

    def counting(tables, *args, **kwargs):
        calls.append(tuple(tables.meta[:, kernel.META_NUMEL.value].tolist()))
        return launch(tables, *args, **kwargs)
    monkeypatch.setattr(kernel, "launch", counting)
    return calls


@pytest.fixture
def table_builds(monkeypatch):
    """Records each build of launch tables as its number of tensors."""
    from adopt_triton.kernels import adopt as kernel
    calls = []
    build = kernel.make_tables

    def counting(numels, *args, **kwargs):
        calls.append(len(numels))
        return build(numels, *args, **kwargs)
    monkeypatch.setattr(kernel, "make_tables", counting)
    return calls
