import io
import pickle

import pytest
import torch

from progan_fast.checkpoint import FORMAT_VERSION, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


def test_save_keeps_the_newest_and_loads_back(tmp_path):
    for images in (100, 200, 300, 400):
        save_checkpoint(tmp_path, images, {"w": torch.full((2,), float(images))}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-000000000300.pt", "ckpt-000000000400.pt"]
    state = load_checkpoint(tmp_path / names[-1])
    assert state["format_version"] == FORMAT_VERSION and torch.equal(state["w"], torch.full((2,), 400.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "ckpt-000000000001.pt"
    buf = io.BytesIO()
    torch.save({"format_version": 1, "x": Evil()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, {})
    torch.save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)
    torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError, match="not a progan_fast checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
