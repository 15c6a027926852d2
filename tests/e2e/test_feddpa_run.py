"""A FedDPA run: its checkpoint keeps one global LoRA for everyone and a personal local
LoRA per client."""

import torch

from helpers import SMOKE, run_main, small_overrides
from pilot_hpc.fl.strategies.feddpa import GLOBAL, LOCAL


def test_run_keeps_one_global_and_personal_local_loras(small_world, cache_dir, tmp_path):
    from pilot_hpc import checkpoint

    out = tmp_path / "dpa"
    args = ["--config", SMOKE] + small_overrides(cache_dir, str(out)) + ["fl.strategy=feddpa", "fl.rounds=1"]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = checkpoint.read(str(out / "checkpoints" / "round_001.h5"))
    states = [ck.clients[k].state for k in range(3)]
    glob = sorted(k for k in states[0] if k.startswith("lora.") and f".{GLOBAL}." in k)
    loc = sorted(k for k in states[0] if k.startswith("lora.") and f".{LOCAL}." in k)
    assert glob and len(glob) == len(loc)
    for key in glob:  # every client installed the one FedAvg'd global LoRA
        assert torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key]), key
    # Each client's local LoRA trained on its own data only: all three differ (B left zero).
    b_keys = [k for k in loc if ".lora_B." in k]
    flat = [torch.cat([st[k].reshape(-1) for k in b_keys]) for st in states]
    assert all(f.abs().max() > 0 for f in flat)
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[1], flat[2]) and not torch.equal(flat[0], flat[2])
