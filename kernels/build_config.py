"""Which variant of the native library ``setup.py`` builds: the CUDA kernels with the CPU twins, or
the CPU twins only, and the one line that says why. Plain Python without torch or setuptools
imports, so that the tests check every decision (``tests/test_build_config.py``) without building.

CUDA kernels + CPU twins when all of these hold, the CPU twins only otherwise:

- ``PROGAN_FAST_CUDA`` is not ``0`` (``1`` builds them even without a visible GPU; unset builds them
  when a GPU is visible, so a plain install on a machine without one stays quick);
- torch is a CUDA build;
- a complete CUDA toolkit with nvcc is found;
- nvcc's major CUDA version (``nvcc --version``: "release 13.0") is torch's (``torch.version.cuda``):
  torch's cpp_extension refuses to build across major versions, which would fail ``pip install``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess


def find_nvcc_home() -> str | None:
    """The first complete CUDA toolkit (bin/nvcc and include/crt/host_config.h) among CUDA_HOME, the
    nvcc on PATH, /usr/local/cuda and the newest /usr/local/cuda-*. (torch's own detection can settle
    on a directory whose nvcc is a wrapper without the toolkit's headers.)"""
    candidates = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "crt", "host_config.h")):
            return os.path.realpath(home)
    return None


def parse_nvcc_release(text: str) -> str | None:
    """"13.0" from ``nvcc --version``'s "Cuda compilation tools, release 13.0, V13.0.88"; None without one."""
    match = re.search(r"\brelease (\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def nvcc_release(home: str) -> str | None:
    """The CUDA version of ``home``'s nvcc; None when it does not run or names no release."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_release(out)


def want_cuda(torch, find_home=find_nvcc_home, release_of=nvcc_release) -> tuple[bool, str]:
    """``(build the CUDA kernels?, why)`` for the installed ``torch``; ``find_home`` and ``release_of``
    look at this machine (tests pass stand-ins). Sets CUDA_HOME to the toolkit when the answer is yes."""
    wanted = os.environ.get("PROGAN_FAST_CUDA", "").strip()
    if wanted == "0":
        return False, "PROGAN_FAST_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    home = find_home()
    if home is None:
        return False, "no CUDA toolkit with nvcc found (set CUDA_HOME)"
    if wanted != "1" and not torch.cuda.is_available():
        return False, "no GPU visible (PROGAN_FAST_CUDA=1 builds the CUDA kernels anyway)"
    release = release_of(home)
    if release is None:
        return False, f"could not read the CUDA version of {home}/bin/nvcc from nvcc --version"
    torch_major = str(torch.version.cuda).split(".")[0]
    if release.split(".")[0] != torch_major:
        return False, (f"nvcc in {home} is CUDA {release} but torch {torch.__version__} is built for CUDA "
                       f"{torch.version.cuda}; set CUDA_HOME to a CUDA {torch_major}.x toolkit for the CUDA kernels")
    os.environ["CUDA_HOME"] = home  # before cpp_extension is imported: it reads CUDA_HOME once
    return True, f"torch {torch.__version__}, nvcc {release} in {home}"
