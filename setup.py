"""Packaging entry point for progan_fast.

Version ranges here say what the code supports; ``constraints.txt`` pins the exact set that is
tested (the one place where versions are pinned).
"""

from setuptools import find_packages, setup

setup(
    name="progan_fast",
    version="0.1.0",
    description="A performance-focused Progressive Growing of GANs (ProGAN) training engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["progan_fast", "progan_fast.*"]),
    package_data={"progan_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.11,<2.15",  # the GPU reference machine has 2.11; 2.14.1 is the newest tested
        "numpy>=1.24",
        "Pillow>=10.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "nvtx>=0.2.10",  # NVTX ranges for Nsight (--nvtx); a no-op without a GPU
        # Triton kernels; on a machine without a GPU they run (slowly, for tests) in its interpreter.
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["progan-fast-train=progan_fast.train:main"]},
)
