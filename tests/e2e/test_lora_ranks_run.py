"""Clients of different LoRA ranks (zero_pad) with ATA on the LoRA products, through a
whole 3-rank run: the checkpoint records the ranks, every client's components beyond its
rank stay exactly zero while the others train, export writes the client's own rank, and
W = 1, preempted and resumed, gives the same numbers bitwise."""

import json

import torch

from helpers import args_for, load_metrics, run_main

RANKS = [2, 8, 4]  # the smoke model's model.lora_r is 8


def test_zero_pad_ranks_with_product_distance(cache_dir, tmp_path):
    from pilot_hpc.checkpoint import read
    from pilot_hpc.export import export_client, find_checkpoint

    out = tmp_path / "run"
    # 0.01 MiB chunks (2621 float32 columns): LoRA factors straddle the chunks of the Gram pass.
    proc = run_main(args_for(cache_dir, out) + [f"model.lora_ranks={RANKS}", "pilot.distance=product",
                                                "fl.chunk_mb=0.01"], np=3, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = find_checkpoint(str(out), None)
    ck = read(path)
    assert ck.round == 2 and json.loads(ck.attrs["lora_ranks"]) == RANKS
    for k, rank in enumerate(RANKS):
        state = ck.clients[k].state
        a_keys = [key for key in state if ".lora_A." in key]
        assert a_keys
        for key in a_keys:
            a, b = state[key], state[key.replace(".lora_A.", ".lora_B.")]
            assert a.shape[0] == b.shape[1] == 8
            assert a[rank:].abs().sum() == 0 and b[:, rank:].abs().sum() == 0, (k, key)
            assert b[:, :rank].abs().sum() > 0, (k, key)  # B starts at zero: it trained and was mixed
    info = export_client(str(out), 0, str(tmp_path / "export0"))
    adapter = json.loads((tmp_path / "export0" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 16 * 2 / 8  # the run's scaling alpha / R kept
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "export0" / "adapter_model.safetensors"))
    state = ck.clients[0].state
    for name, t in tensors.items():
        assert (t.shape[0] if "lora_A" in name else t.shape[1]) == 2, name
    # The exported rank-2 product equals the run's padded one, module by module.
    a_run = {key: v for key, v in state.items() if ".lora_A." in key}
    for key, a in a_run.items():
        b = state[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("lora.").removeprefix("base_model.model.")
        (a_name,) = [n for n in tensors if module in n and "lora_A" in n]
        b_exp = tensors[a_name.replace("lora_A", "lora_B")]
        torch.testing.assert_close(b_exp @ tensors[a_name], b @ a, rtol=0, atol=0)
    assert info["client"] == 0
    # W = 1, unchunked, preempted mid-round 2 and resumed: the same numbers bitwise (the
    # product Gram is computed per module on the assembled factors, whatever the chunking
    # and the ranks; the checkpoint restores every client's padded factors).
    one = tmp_path / "w1"
    args = args_for(cache_dir, one) + [f"model.lora_ranks={RANKS}", "pilot.distance=product", "fl.chunk_mb=0"]
    proc = run_main(args, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_main(args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interrupted mid-round" in proc.stdout
    assert load_metrics(one)["final"] == load_metrics(out)["final"]
    ck1 = read(find_checkpoint(str(one), None))
    for k in range(len(RANKS)):
        for key, t in ck.clients[k].state.items():
            assert torch.equal(ck1.clients[k].state[key], t), (k, key)
