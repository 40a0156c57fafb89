"""A run killed with SIGKILL in the middle of writing a checkpoint loses at most that checkpoint
interval: the half-written file never counts as a checkpoint, and --resume auto continues from the
last complete one."""

import os
import signal
import subprocess
import sys
import time

import torch

from progan_fast import train
from progan_fast.checkpoint import list_checkpoints, load_checkpoint

from test_training import TINY, final_state

# Runs the trainer with torch.save patched so that the second checkpoint write stalls halfway:
# it writes a zip header, flushes, says so on stdout and waits to be killed.
STALLING_TRAINER = r"""
import sys, time, torch
real_save = torch.save
calls = {"n": 0}
def stalling_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(120)
    return real_save(obj, f, *args, **kwargs)
torch.save = stalling_save
from progan_fast import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_loses_at_most_one_interval(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--out", str(out), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_TRAINER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "WRITING" in line, "the trainer never reached its second checkpoint write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    folder = out / "checkpoints"
    torn = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert torn, "the kill should have left the half-written temporary file"
    complete = list_checkpoints(folder)
    assert len(complete) == 1  # the first phase's checkpoint; the second never became one
    first = load_checkpoint(complete[0])
    assert first["phase_index"] == 1 and first["step"] == 0

    assert train.main(TINY + ["--out", str(out), "--resume", "auto"]) == 0
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # the torn write was cleaned up
    final = final_state(out)
    assert final["phase_index"] == 3
    assert all(torch.isfinite(t).all() for t in final["G"].values())
