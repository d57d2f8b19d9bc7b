"""A plain (non-editable) install ships the kernels as adopt_triton.kernels."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_plain_install_provides_adopt_triton_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    assert (target / "adopt_triton" / "kernels" / "adopt.py").is_file()
    assert not (target / "kernels").exists()  # no top-level module named `kernels`
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import adopt_triton.kernels.adopt as k, adopt_triton as a; "
            "assert k.__file__.startswith(sys.argv[1]) and a.__file__.startswith(sys.argv[1]), (k.__file__, a.__file__); "
            "print(a.ADOPT.__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ADOPT", out.stderr
