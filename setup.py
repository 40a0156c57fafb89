"""Packaging entry point for progan_fast.

Version ranges here say what the code supports; ``constraints.txt`` pins the exact set that is
tested (the one place where versions are pinned).

The native library ``progan_fast._C`` (sources in ``kernels/``) is built with torch's
cpp_extension against the torch that is installed, so install torch first and build without
isolation (README: ``pip install --no-build-isolation``): an isolated build would compile against
a second, possibly different torch and the library would not load. Which variant is built:

- CUDA kernels + CPU twins when torch is a CUDA build, nvcc is found, its major CUDA version is
  torch's, and CUDA is wanted: ``PROGAN_FAST_CUDA=1`` forces it, ``PROGAN_FAST_CUDA=0`` forbids it,
  unset means "when a GPU is visible" (so a plain install on a machine without a GPU stays quick);
- the CPU twins only, otherwise (``kernels/build_config.py`` decides, and is tested);
- nothing when torch is not importable at build time (the native backends then report themselves
  unavailable, with the reason). One line on stderr says which.
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
KERNELS = "kernels"


def _say(message: str) -> None:
    print(f"progan_fast: {message}", file=sys.stderr, flush=True)


def _build_config():
    """kernels/build_config.py, loaded by path: the build runs from the source tree, not an install."""
    spec = importlib.util.spec_from_file_location("progan_fast_build_config",
                                                  os.path.join(ROOT, KERNELS, "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_wheel_includes() -> list[str]:
    """CUDA pip wheels (torch >= 2.9's nvidia-*-cu13) keep headers torch's own headers may need (CCCL,
    cuBLAS) under site-packages/nvidia/cu*/include; cpp_extension does not add them. They go last
    (-idirafter, C++ only): the toolkit's own headers must win."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _cpu_math_flags() -> list[str]:
    """The twins' lerp is torch.lerp's formula with fused multiply-adds (so it matches ATen bit for
    bit). Without -mfma, x86 compilers turn std::fma into a call to glibc's exact software fma, far
    slower than the instruction. The library is compiled on the machine that runs it, so -mfma is
    used when this CPU has FMA. -ffp-contract=off keeps every other a*b+c exactly as written (GCC
    would otherwise contract them once FMA is enabled)."""
    import platform

    flags = ["-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                has_fma = any(line.startswith("flags") and " fma " in f" {line.split(':', 1)[1]} " for line in f)
        except OSError:
            has_fma = False
        if has_fma:
            flags.append("-mfma")
    return flags


def _extensions():
    try:
        import torch
    except ImportError:
        _say("building WITHOUT the native library: torch is not importable at build time "
             "(install torch first, then pip install --no-build-isolation)")
        return [], {}
    with_cuda, why = _build_config().want_cuda(torch)
    from torch.utils import cpp_extension  # after want_cuda: it reads CUDA_HOME when imported

    # Every op's sources by glob (CMakeLists.txt globs the same): the CPU twins and the glue always;
    # the glue's CUDA half (#ifdef PROGAN_WITH_CUDA) and the .cu kernels only in CUDA builds.
    cpu_sources = sorted(glob.glob(f"{KERNELS}/cpu/*.cpp")) + sorted(glob.glob(f"{KERNELS}/bindings/*.cpp"))
    include_dirs = [os.path.join(ROOT, KERNELS, "include")]
    cxx = ["-O3", "-Wall", "-Wno-unused-function"] + _cpu_math_flags()  # C++ standard: torch's (C++20 from 2.14)
    if with_cuda:
        sources = cpu_sources + sorted(glob.glob(f"{KERNELS}/cuda/*.cu"))
        archs = os.environ.get("PROGAN_FAST_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = cpp_extension.CUDAExtension(
            "progan_fast._C", sources, include_dirs=include_dirs, define_macros=[("PROGAN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + [f"-idirafter{d}" for d in _cuda_wheel_includes()], "nvcc": nvcc})
        _say(f"building progan_fast._C WITH CUDA kernels (sm_{', sm_'.join(archs)}; {why})")
    else:
        ext = cpp_extension.CppExtension("progan_fast._C", cpu_sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx})
        _say(f"building progan_fast._C with CPU kernels only ({why})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="progan_fast",
    version="0.1.0",
    description="A performance-focused Progressive Growing of GANs (ProGAN) training engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["progan_fast", "progan_fast.*"]),
    package_data={"progan_fast": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11,<2.15",  # the GPU reference machine has 2.11; 2.14.1 is the newest tested
        "numpy>=1.24",
        "Pillow>=10.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        # Triton kernels; on a machine without a GPU they run (slowly, for tests) in its interpreter.
        "triton>=3.6; platform_system == 'Linux'",
    ],
    # --nvtx goes through torch.cuda.nvtx on CUDA builds of torch; the nvtx package is only needed
    # for NVTX ranges with a CPU build of torch. Not a requirement: the GPU machines do not have it
    # and cannot download it, and a requirement pip cannot meet stops the whole install there.
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4"], "nvtx": ["nvtx>=0.2.10"]},
    entry_points={"console_scripts": ["progan-fast-train=progan_fast.train:main"]},
)
