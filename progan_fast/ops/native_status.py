"""``python -m progan_fast.ops.native_status``: which native library loaded, with which kernels.

A module of its own so that ``python -m`` does not re-run ``_native`` after the ops package has
already imported it. Exits 1 when the library did not load, and also when a GPU is visible but the
library holds no CUDA kernels: on a GPU machine that install has lost the ``cuda`` backend, and a
check that says "passed" there would hide it (tools/gpu_verify.py's native-status stage relies on it).
"""

import sys

import torch

from . import _native


def main() -> int:
    print(_native.describe())
    if not _native.available():
        return 1
    if torch.cuda.is_available() and not _native.has_cuda_kernels():
        print("error: a CUDA device is visible but progan_fast._C has no CUDA kernels: "
              + _native.why_unavailable("cuda"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
