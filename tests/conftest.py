import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reference_backend():
    """Every test starts (and leaves) the process-wide op backend at the reference."""
    from progan_fast import ops

    ops.set_default_backend("reference")
    yield
    ops.set_default_backend("reference")
