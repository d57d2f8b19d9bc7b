"""pytest plugin: every test that takes the ``kernel_device`` fixture gets the
``kernel_device`` marker, so

    TRITON_INTERPRET=0 python3 -P -m pytest -p kernel_device_plugin -m "kernel_device or cuda" tests

runs exactly the tests that exercise the Triton kernels, compiled, on CUDA
tensors (tests/test_cuda.py and bench/run_gpu.sh do this; tests/ must be on
sys.path for ``-p`` to find this module). The selection follows the fixture,
not the text of the files.
"""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel_device: takes the kernel_device fixture (runs the Triton "
                                       "kernels; on CUDA tensors when they are compiled)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel_device)
