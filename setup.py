from setuptools import setup

setup(
    name="adopt-triton",
    version="0.1.0",
    description="The ADOPT optimizer (Taniguchi et al., NeurIPS 2024) with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # kernels/ is a top-level folder of the repository but ships as
    # adopt_triton.kernels, so it cannot collide with other distributions.
    packages=["adopt_triton", "adopt_triton.kernels"],
    package_dir={"adopt_triton": "adopt_triton", "adopt_triton.kernels": "kernels"},
    install_requires=["torch>=2.5", "triton"],
    extras_require={
        # pandas and matplotlib: the CPU smoke run of bench/ (triton's perf_report, plots).
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "torch-adopt==0.1.0", "pandas", "matplotlib",
                 "deepspeed==0.19.8", "scikit-learn"],
        "examples": ["scikit-learn", "tqdm", "matplotlib", "numpy", "pillow", "torch-adopt==0.1.0"],
        # Peers compared in bench/. timm needs torchvision, hence a torch build that has one.
        "bench": ["pytest-benchmark", "pandas", "matplotlib", "torch-adopt==0.1.0",
                  "pytorch-optimizer==4.1.0", "heavyball==3.2.1", "timm==1.0.31"],
    },
)
