"""End to end: the same small federation with W = 1 (no mpiexec) and under `mpiexec -n 3`.

Checks: identical `final` metrics for both world sizes, exactly the adapter bytes and
sample counts crossing ranks, round checkpoints, the outputs, and that bad data stops
every rank before training.
"""

import json
import os
import shutil

import pytest

from helpers import CHUNK_MB, llava_json_args, load_metrics, run_main
from pilot_hpc import checkpoint


def test_final_metrics_do_not_depend_on_world_size(runs):
    out, _, _ = runs
    a, b = load_metrics(out / "w1"), load_metrics(out / "w3")
    assert [r["round"] for r in a["rounds"]] == [0, 1, 2]
    assert len(a["final"]) == 3 and {c["task"] for c in a["final"]} == {"vqa", "caption", "grounding"}
    assert a["final"] == b["final"]  # bitwise: values and the mean losses
    assert a["rounds"] == b["rounds"]


def test_outputs_and_progress_lines(runs):
    out, one, three = runs
    for name in ("metrics.json", "results.md", "metrics.png"):
        assert (out / "w3" / name).stat().st_size > 0, name
    assert "| **mean** | all |" in (out / "w3" / "results.md").read_text()
    for r in (1, 2):
        assert f"round {r}/2 stage {1 if r == 1 else 2}" in three.stdout
    assert "| client | task | metric |" in three.stdout


def test_round_checkpoints_hold_every_client(runs):
    out, _, _ = runs
    for r in (1, 2):
        path = out / "w3" / "checkpoints" / f"round_{r:03d}.h5"
        ck = checkpoint.read(str(path))
        assert ck.round == r and ck.complete
        assert sorted(ck.clients) == [0, 1, 2]
        assert [row["round"] for row in ck.history] == list(range(r + 1))
        state = ck.clients[2].state
        assert any(k.startswith("connector.router") for k in state)
        assert any(k.startswith("connector.cross") for k in state)
        assert any(".lora_A." in k for k in state)
        assert not any("vision_tower" in k or "embed_tokens" in k for k in state)  # no frozen base weights
    assert not list((out / "w3" / "checkpoints").glob("*.tmp"))


def expected_sizes(cfg):
    """Adapter and LoRA sizes from the architecture, independently of the code under test."""
    m = cfg.model
    cv, c, inter, r = m.vision_hidden, m.text_hidden, m.text_intermediate, m.lora_r
    p_vis = cv * c + c + c * c + c  # Linear(Cv, C) + Linear(C, C), with biases
    per_layer = 4 * r * (c + c) + 2 * r * (c + inter) + r * (inter + c)  # q k v o, gate up, down
    return p_vis, m.text_layers * per_layer


def test_only_adapters_and_sample_counts_cross_ranks(runs, small_world):
    """The W = 3 run streams with fl.chunk_mb = CHUNK_MB: every message and its bytes, exactly."""
    out, _, _ = runs
    cfg = small_world[0]
    p_vis, p_lora = expected_sizes(cfg)
    f32, i64, f64 = 4, 8, 8
    # stats: the metrics gather's numbers per client (federation.STAT_KEYS: the metric, five
    # losses, steps, unreadable samples, the round's participation code).
    num_tasks, rounds, stats = 3, 2, 9
    cols = int(CHUNK_MB * 2 ** 20) // f32
    vis = [min(cols, p_vis - a) for a in range(0, p_vis, cols)]
    txt = [min(cols, p_lora - a) for a in range(0, p_lora, cols)]
    assert len(vis) == 2 and len(txt) == 3 and txt[-1] != cols  # the chunk does not divide the parts
    # Per round: the stop vote, (client, samples, participation) per client, ATA's Gram pass over the
    # LoRA, then each visual chunk and its broadcast, each LoRA chunk and its scatter.
    per_round = ["stop", "num_samples"] + ["gram"] * len(txt) + ["update", "shared"] * len(vis) \
        + ["update", "personal"] * len(txt) + ["metrics", "trace"]
    for rank in (0, 1, 2):
        with open(out / "w3" / "traffic" / f"rank_{rank:03d}.json") as fh:
            log = json.load(fh)
        assert [t["tag"] for t in log] == ["all_ok", "all_ok", "all_ok", "resume", "metrics"] + per_round * rounds
        sizes = {"gram": txt, "update": vis + txt, "shared": vis, "personal": txt}
        for r in range(rounds):
            entries = log[5 + r * len(per_round):5 + (r + 1) * len(per_round)]
            for tag, widths in sizes.items():
                got = [(t["sent"], t["received"]) for t in entries if t["tag"] == tag]
                if tag in ("gram", "update"):  # gathers: the two others' rows into rank 0
                    want = [(0, 2 * w * f32) if rank == 0 else (w * f32, 0) for w in widths]
                else:  # shared: T task-adapter rows to 2 ranks; personal: one LoRA row each
                    rows = num_tasks if tag == "shared" else 1
                    want = [(2 * rows * w * f32, 0) if rank == 0 else (0, rows * w * f32) for w in widths]
                assert got == want, (rank, r, tag)
        for t in log:
            if t["tag"] == "num_samples":
                # (client, samples, participation code) per sending client: stream.META
                assert (t["sent"], t["received"]) == ((0, 2 * 3 * i64) if rank == 0 else (3 * i64, 0))
            if t["tag"] == "metrics":
                assert (t["sent"], t["received"]) == ((0, 2 * stats * f64) if rank == 0 else (stats * f64, 0))
            if t["tag"] == "trace":  # TensorBoard's per-step loss trace: 3 steps x 7 numbers per client
                assert (t["sent"], t["received"]) == ((0, 2 * 3 * 7 * f64) if rank == 0 else (3 * 7 * f64, 0))


def processor_saved_copy(base, folder):
    """The base model's folder as transformers 5 writes a LLaVA checkpoint: the model's
    files and LlavaProcessor.save_pretrained (processor_config.json, no
    preprocessor_config.json)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    os.makedirs(folder)
    for name in os.listdir(base):
        if name.endswith((".safetensors", ".json")) and "token" not in name and "processor" not in name:
            shutil.copy(os.path.join(base, name), folder)
    LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(base), tokenizer=AutoTokenizer.from_pretrained(base),
                   patch_size=16, vision_feature_select_strategy="default").save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "processor_config.json"))
    assert not os.path.exists(os.path.join(folder, "preprocessor_config.json"))
    return folder


def test_real_data_path_reproduces_the_synthetic_run(runs, small_world, tmp_path):
    """model.path + data.kind=llava_json on the same files runs the same code to the same
    result, from a model folder as LlavaProcessor.save_pretrained writes it."""
    from pilot_hpc.data.synthetic import client_files

    out, _, _ = runs
    train, _ = client_files(small_world[1], 3)
    model = processor_saved_copy(small_world[2], str(tmp_path / "llava-hf"))
    proc = run_main(llava_json_args(small_world, tmp_path / "real", train) + [f"model.path={model}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert load_metrics(tmp_path / "real")["final"] == load_metrics(out / "w1")["final"]


@pytest.mark.parametrize("defect,np_,message", [
    ("missing_image", 3, "client_01_train.json: record 3 (id 'client_01_train-000003'): image file"),
    ("malformed_json", None, "client_01_train.json: not a valid LLaVA JSON file"),
    ("wrong_roles", 3, "client_01_train.json: record 0 (id 'client_01_train-000000'): turns 0-1 must be from"),
])
def test_bad_data_stops_every_rank_before_training(small_world, tmp_path, defect, np_, message):
    from pilot_hpc.data.synthetic import client_files

    train, _ = client_files(small_world[1], 3)
    with open(train[1]) as fh:
        records = json.load(fh)
    bad = tmp_path / "client_01_train.json"
    if defect == "missing_image":
        records[3]["image"] = "images/missing/000003.png"
        bad.write_text(json.dumps(records))
    elif defect == "malformed_json":
        bad.write_text(json.dumps(records)[:-40])  # truncated file
    else:
        records[0]["conversations"].reverse()
        bad.write_text(json.dumps(records))
    out = tmp_path / "out"
    proc = run_main(llava_json_args(small_world, out, [train[0], str(bad), train[2]]), np=np_, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "round 1" not in proc.stdout and not (out / "checkpoints").exists()
