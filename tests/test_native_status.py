"""``python -m progan_fast.ops.native_status``: its exit code is what tools/gpu_verify.py's
native-status stage reports, so a GPU machine whose install lost the CUDA kernels must fail it."""

import pytest
import torch

from progan_fast.ops import _native, native_status


@pytest.mark.parametrize("gpu, loaded, cuda_kernels, code", [
    (True, True, False, 1),   # a GPU is visible, the library holds no CUDA kernels: the cuda backend is lost
    (True, True, True, 0),
    (False, True, False, 0),  # no GPU: the CPU twins are all there can be
    (False, False, False, 1),  # the library did not load at all
])
def test_exit_code(monkeypatch, capsys, gpu, loaded, cuda_kernels, code):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(_native, "available", lambda: loaded)
    monkeypatch.setattr(_native, "has_cuda_kernels", lambda: cuda_kernels)
    monkeypatch.setattr(_native, "describe", lambda: "described")
    assert native_status.main() == code
    captured = capsys.readouterr()
    assert captured.out.strip() == "described"
    if gpu and loaded and not cuda_kernels:
        assert captured.err.startswith("error: a CUDA device is visible but progan_fast._C has no CUDA kernels")
