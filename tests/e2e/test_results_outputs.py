"""What a run leaves for a researcher: predictions files that re-score to metrics.json,
TensorBoard event files, and exported clients that answer as the run evaluated them.

Two small runs, shared by the module: Pilot under mpiexec -n 3 (the traces and metrics
cross ranks) with 2 rounds, FedAvg with W = 1 and 1 round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from helpers import REPO, SMOKE, load_metrics, run_main, small_overrides

from pilot_hpc.metrics import scores
from pilot_hpc.metrics.generation import read_predictions


@pytest.fixture(scope="module")
def result_runs(runs, small_world, cache_dir, tmp_path_factory):
    """Pilot: the session's W = 3 run (conftest `runs`); FedAvg: one round, W = 1."""
    out = tmp_path_factory.mktemp("results")
    fedavg = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(out / "fedavg"))
                      + ["fl.strategy=fedavg", "fl.rounds=1"], timeout=600)
    assert fedavg.returncode == 0, fedavg.stdout[-3000:] + fedavg.stderr[-3000:]
    return {"pilot": runs[0] / "w3", "fedavg": out / "fedavg", "out": out}


def _predictions(run, round_, k):
    return read_predictions(os.path.join(str(run), "predictions", f"round_{round_:03d}", f"client_{k:02d}.jsonl"))


@pytest.mark.parametrize("name", ["pilot", "fedavg"])
def test_predictions_rescore_to_metrics_json(result_runs, small_world, name):
    run = result_runs[name]
    metrics = load_metrics(run)
    seen = 0
    for entry in metrics["rounds"]:
        for row in entry["clients"]:
            lines = _predictions(run, entry["round"], row["client"])
            evalset = json.load(open(os.path.join(small_world[1], f"client_{row['client']:02d}_eval.json")))
            assert [ln["id"] for ln in lines] == [r["id"] for r in evalset]  # every sample, in order
            refs = [ln["references"] if row["metric"] in scores.MULTI_REFERENCE else ln["reference"] for ln in lines]
            value, items = scores.score_items(row["metric"], [ln["prediction"] for ln in lines], refs)
            # Exactly the table's number: metrics.json stores round(100 * value, 4).
            assert round(100.0 * value, 4) == row["value"]
            assert [ln["score"] for ln in lines] == items
            for ln in lines:  # the LLaVA answer-file fields
                assert ln["question_id"] == ln["id"] and ln["text"] == ln["prediction"]
                assert ln["prompt"].startswith("<image>\n") and ln["model_id"] and ln["answer_id"]
            seen += 1
    assert seen == 3 * len(metrics["rounds"])


def test_tensorboard_holds_the_expected_scalars(result_runs):
    from pilot_hpc.tensorboard import STEPS_PER_ROUND, read_scalars

    run = result_runs["pilot"]
    metrics = load_metrics(run)
    scalars = read_scalars(os.path.join(str(run), "tensorboard"))
    for entry in metrics["rounds"]:
        for row in entry["clients"]:
            got = dict(scalars[f"client_{row['client']:02d}/{row['metric']}"])
            # float32 in the event file: 4 decimals of a percent survive to 1e-4 relative.
            assert got[entry["round"]] == pytest.approx(row["value"], rel=1e-6, abs=1e-4)
            if entry["round"] > 0:
                steps = [s for s, _ in scalars[f"client_{row['client']:02d}/loss/ce"]
                         if (entry["round"] - 1) * STEPS_PER_ROUND < s <= entry["round"] * STEPS_PER_ROUND]
                assert len(steps) == row["steps"] > 0  # every local step, from every rank
                ce = [v for s, v in scalars[f"client_{row['client']:02d}/loss/ce"] if s in steps]
                assert sum(ce) / len(ce) == pytest.approx(row["ce"], rel=1e-5)  # float32 terms
    for tag in ("task/vqa", "task/caption", "task/grounding", "round/seconds"):
        assert [s for s, _ in scalars[tag]] == [e["round"] for e in metrics["rounds"]]
    assert all(v > 0 for _, v in scalars["exchange/bytes"]) and len(scalars["exchange/bytes"]) == 2
    assert "client_00/lr" in scalars and "client_02/samples_per_s" in scalars
    assert len([n for n in os.listdir(os.path.join(str(run), "tensorboard")) if "tfevents" in n]) == 1  # rank 0 only


def _export(run, k, out):
    proc = subprocess.run([sys.executable, "-m", "pilot_hpc.export", "--run", str(run), "--client", str(k),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("name,k", [("pilot", 1), ("fedavg", 0)])
def test_exported_client_reproduces_its_last_predictions(result_runs, small_world, name, k):
    run = result_runs[name]
    folder = _export(run, k, result_runs["out"] / f"export_{name}_{k}")
    info = json.load(open(folder / "connector.json"))
    assert info["plain_projector"] is (name == "fedavg") and (folder / "merged").is_dir() is (name == "fedavg")
    answers = result_runs["out"] / f"answers_{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pilot_hpc.generate", "--model", str(folder), "--data",
                           os.path.join(small_world[1], f"client_{k:02d}_eval.json"), "--out", str(answers)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = load_metrics(run)["rounds"][-1]["round"]
    want = [(ln["id"], ln["prediction"]) for ln in _predictions(run, last, k)]
    got = [(a["id"], a["prediction"]) for a in map(json.loads, open(answers))]
    assert got == want


# Loads the merged folder with transformers alone: started with -I -S (no PYTHONPATH, no
# site processing, so no editable-install hook), site-packages added by hand.
_STOCK = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("pilot_hpc") is None, "pilot_hpc is importable"
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration
folder, data, root = sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
tok, proc = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
v = model.config.vision_config
n = (v.image_size // v.patch_size) ** 2
out = []
for rec in data:
    q = rec["conversations"][0]["value"].replace("<image>", "").strip()
    ids = tok("USER: " + "<image>" * n + "\n" + q + " ASSISTANT:", return_tensors="pt")
    px = proc(images=[Image.open(root + "/" + rec["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        gen = model.generate(**ids, pixel_values=px, max_new_tokens=int(sys.argv[5]), do_sample=False,
                             pad_token_id=tok.pad_token_id)
    out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps(out))
"""


def test_fedavg_merged_folder_loads_with_transformers_alone(result_runs, small_world):
    folder = result_runs["out"] / "export_fedavg_0"
    if not folder.is_dir():
        _export(result_runs["fedavg"], 0, folder)
    data = os.path.join(small_world[1], "client_00_eval.json")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _STOCK, sysconfig.get_paths()["purelib"],
                           str(folder / "merged"), data, small_world[1], "12"],
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    # One prompt at a time (no padding) and the LoRA merged: the greedy answers of the
    # round's predictions file (train.max_new_tokens=12 in small_overrides).
    assert answers == [ln["prediction"] for ln in _predictions(result_runs["fedavg"], 1, 0)]


def test_a_resumed_run_writes_the_same_predictions(result_runs, cache_dir):
    """A W = 1 run preempted in round 2 (SIGTERM mid-step), rerun: the same files, byte for
    byte, as the uninterrupted W = 3 Pilot run of the fixture."""
    out = str(result_runs["out"] / "pilot_resumed")
    args = ["--config", SMOKE] + small_overrides(cache_dir, out)
    first = run_main(args, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "predictions", "round_002"))  # round 2 not evaluated yet
    second = run_main(args, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for round_ in range(3):
        for k in range(3):
            name = os.path.join("predictions", f"round_{round_:03d}", f"client_{k:02d}.jsonl")
            with open(os.path.join(str(result_runs["pilot"]), name), "rb") as a:
                with open(os.path.join(out, name), "rb") as b:
                    assert a.read() == b.read(), name
