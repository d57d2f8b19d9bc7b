"""pytest plugin: every test that takes the ``kernel_device`` fixture gets the
``kernel`` marker (as tests/conftest.py is to do itself), so

    TRITON_INTERPRET=0 python3 -P -m pytest -p kernel_marker_plugin -m "kernel or cuda" tests

runs exactly the tests that exercise the Triton kernels, compiled, on CUDA
tensors (tests/test_cuda.py and bench/run_gpu.sh do this; tests/ must be on
sys.path for ``-p`` to find this module). The selection follows the fixture,
not the text of the files. Once tests/conftest.py marks them, this plugin
only repeats it (a marker added twice selects the same tests).
"""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: runs the Triton kernel on `kernel_device` (the CPU "
                                       "interpreter, or CUDA with compiled kernels); set automatically")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kernel)
