import io
import pickle

import pytest
import torch

from progan_fast.checkpoint import (
    FORMAT_VERSION, CheckpointError, check_compatible, list_checkpoints, load_checkpoint, save_checkpoint,
)


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
    for content, reason in ((b"", "an empty file"), (b"hello, not a checkpoint", "not a torch.save archive")):
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(e.value) == f"checkpoint {path} is corrupt or not a progan_fast checkpoint ({reason})"


def _config(**changes):
    base = {"data": None, "max_res": 32, "latent_size": 512, "fmap_base": 512, "lr": 0.001, "seed": 0}
    return {**base, **changes}


def test_check_compatible_accepts_the_same_configuration(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"config": _config()})
    check_compatible(load_checkpoint(path), _config(), path=path)  # no error
    check_compatible({"config": _config(max_res=16)}, _config(), ignore=("max_res",))  # growing is allowed when asked


def test_check_compatible_names_every_differing_key_with_both_values(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"config": _config(fmap_base=256, lr=0.002, data="/photos")})
    with pytest.raises(CheckpointError) as e:
        check_compatible(load_checkpoint(path), _config(), path=path)
    msg = str(e.value)
    assert str(path) in msg and "different configuration" in msg and "\n" not in msg
    for fragment in ("fmap_base: 256 in the checkpoint, 512 expected", "lr: 0.002 in the checkpoint, 0.001 expected",
                     "data: '/photos' in the checkpoint, None expected"):
        assert fragment in msg
    assert "seed" not in msg and "max_res" not in msg  # equal keys are not listed


def test_check_compatible_refuses_keys_only_one_side_has():
    # A newer progan_fast's checkpoint with a setting this version does not know, and an older one lacking one.
    with pytest.raises(CheckpointError, match=r"style_mixing: 0\.9 in the checkpoint, unknown to this progan_fast"):
        check_compatible({"config": _config(style_mixing=0.9)}, _config())
    old = _config()
    del old["lr"]
    with pytest.raises(CheckpointError, match=r"lr: not in the checkpoint, 0\.001 expected"):
        check_compatible({"config": old}, _config())
    with pytest.raises(CheckpointError, match="no run configuration"):
        check_compatible({"G": {}}, _config())
