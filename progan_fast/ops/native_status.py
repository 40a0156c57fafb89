"""``python -m progan_fast.ops.native_status``: which native library loaded, with which kernels.

A module of its own so that ``python -m`` does not re-run ``_native`` after the ops package has
already imported it. Exits 1 when the library did not load.
"""

import sys

from . import _native

if __name__ == "__main__":
    print(_native.describe())
    sys.exit(0 if _native.available() else 1)
