"""The ProGAN ops. Every model op goes through these functions so kernel backends slot in.

One op = one file, ``ops/<op>.py`` (``fade_in.py`` holds ``fade_in`` and ``fade_reals``), read
top to bottom: the eager ``reference``, the ``torch.library`` custom ops (Triton's, and fake
tensors for the native library's), their autograd, then the backend table and the public
function. The op's Triton kernels are in ``ops/triton/<op>.py``, its native kernels under
``kernels/``; ``ops/common.py`` holds what several ops share. Every public function goes through
:func:`._backend.dispatch`, which picks the backend (``backend=None`` uses the process-wide
default, set once by the trainer's ``--backend`` via :func:`set_default_backend`), opens the op's
NVTX range (``--nvtx``) and applies the autocast policy of :mod:`._amp` (``--amp``).
"""

from . import blend as _blend_module
from . import conv_act
from . import downsample2x as _downsample2x_module
from . import fade_in as _fade_in_module
from . import minibatch_stddev as _mbstd_module
from . import pixel_norm as _pixel_norm_module
from . import _backend, autotune
from ._backend import BackendUnavailableError, KNOWN_BACKENDS, get_default_backend
from .blend import blend
from .conv_act import conv2d_bias_lrelu
from .downsample2x import downsample2x
from .fade_in import fade_in, fade_reals
from .minibatch_stddev import effective_group_size, minibatch_stddev
from .pixel_norm import pixel_norm


def all_op_implementations() -> dict[str, dict]:
    """``{op name: {backend: implementation}}`` for every public op."""
    return {
        "conv2d_bias_lrelu": conv_act.IMPLEMENTATIONS,
        "pixel_norm": _pixel_norm_module.IMPLEMENTATIONS,
        "minibatch_stddev": _mbstd_module.IMPLEMENTATIONS,
        "fade_in": _fade_in_module.FADE_IN_IMPLEMENTATIONS,
        "blend": _blend_module.IMPLEMENTATIONS,
        "downsample2x": _downsample2x_module.IMPLEMENTATIONS,
        "fade_reals": _fade_in_module.FADE_REALS_IMPLEMENTATIONS,
    }


def set_default_backend(name: str, device_type: str = "cpu") -> str:
    """Set the backend every op uses when called with ``backend=None`` (the trainer's ``--backend``)
    for tensors on ``device_type``; returns its name. ``auto`` picks per op call signature, by
    measurement (:mod:`.autotune`). Raises :class:`BackendUnavailableError` when an op lacks a
    named backend or it does not compute on that device."""
    return _backend.set_default_backend(name, device_type, all_op_implementations())


__all__ = [
    "BackendUnavailableError",
    "KNOWN_BACKENDS",
    "all_op_implementations",
    "autotune",
    "blend",
    "conv2d_bias_lrelu",
    "downsample2x",
    "effective_group_size",
    "fade_in",
    "fade_reals",
    "get_default_backend",
    "minibatch_stddev",
    "pixel_norm",
    "set_default_backend",
]
