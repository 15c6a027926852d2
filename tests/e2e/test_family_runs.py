"""Whole runs of the families beyond LLaVA-1.5 (model/families): a reduced model built
from the family's real config classes, saved by the warm start and loaded from its
folder, runs Pilot and FedAvg; a preempted and resumed W = 1 and a W = 3 (through
model.path, the family detected from config.json) agree bitwise; an exported client answers
as its predictions file says, and FedAvg's merged folder loads with transformers alone."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, SMOKE, load_metrics, run_main, small_overrides

# The any-resolution families run the same checks from test_family_runs_anyres.py: two
# files, so that two test workers share the families (a file runs on one worker).
FAMILIES = ["qwen2_5_vl", "qwen2_vl", "internvl"]


def make_family_runs(request, small_world, cache_dir, tmp_path_factory):
    """The family's runs (the module fixture family_runs of each file)."""
    family = request.param
    out = tmp_path_factory.mktemp(f"family_{family}")
    base = ["--config", SMOKE]
    runs = {}
    for name, extra in (("pilot", []), ("fedavg", ["fl.strategy=fedavg"])):
        runs[name] = out / name
        args = base + small_overrides(cache_dir, str(runs[name])) + [f"model.family={family}"] + extra
        if name == "pilot":  # preempted in round 2 (SIGTERM mid-step), then resumed
            proc = run_main(args, timeout=600, env={"PILOT_HPC_INJECT": "sigterm:rank=0,round=2,step=2"})
            assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
        proc = run_main(args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert name != "pilot" or "interrupted mid-round" in proc.stdout
    return family, out, runs


family_runs = pytest.fixture(scope="module", params=FAMILIES, name="family_runs")(make_family_runs)


def _base_folder(run) -> str:
    """The model folder the run loaded (its checkpoint's config names the cache)."""
    from pilot_hpc import checkpoint
    from pilot_hpc.export import base_model_folder, find_checkpoint, run_config

    path = find_checkpoint(str(run), None)
    return base_model_folder(run_config(checkpoint.read(path, clients=[]).attrs, path))


def test_w3_through_model_path_equals_the_preempted_and_resumed_w1(family_runs, cache_dir):
    """A W = 3 run through model.path (the family detected from config.json) ends with the
    metrics of the W = 1 run that was preempted in round 2 and resumed, bitwise: one
    comparison for both guarantees (rank count and resume)."""
    family, out, runs = family_runs
    folder = _base_folder(runs["pilot"])
    with open(os.path.join(folder, "config.json")) as fh:
        assert json.load(fh)["model_type"] == family
    args = ["--config", SMOKE] + small_overrides(cache_dir, str(out / "pilot_w3")) + [f"model.path={folder}"]
    proc = run_main(args, np=3, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = load_metrics(runs["pilot"]), load_metrics(out / "pilot_w3")
    assert got["final"] == ref["final"] and got["rounds"] == ref["rounds"]
    stage1 = ref["rounds"][1]["clients"]
    assert all(c["diff"] == c["diff"] for c in stage1)  # the difference loss was computed (not NaN)


# Pilot's export through pilot_hpc (load_client, generate); FedAvg's export is checked where
# it matters more, its merged folder under transformers alone (below).
@pytest.mark.parametrize("name,k", [("pilot", 1)])
def test_exported_client_answers_as_its_predictions(family_runs, small_world, name, k):
    from pilot_hpc.metrics.generation import read_predictions

    family, out, runs = family_runs
    folder = out / f"export_{name}"
    proc = subprocess.run([sys.executable, "-m", "pilot_hpc.export", "--run", str(runs[name]), "--client", str(k),
                           "--out", str(folder)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.load(open(folder / "connector.json"))
    assert info["family"] == family and (folder / "merged").is_dir() is (name == "fedavg")
    answers = out / f"answers_{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pilot_hpc.generate", "--model", str(folder), "--data",
                           os.path.join(small_world[1], f"client_{k:02d}_eval.json"), "--out", str(answers)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = load_metrics(runs[name])["rounds"][-1]["round"]
    want = [(p["id"], p["prediction"]) for p in read_predictions(
        os.path.join(str(runs[name]), "predictions", f"round_{last:03d}", f"client_{k:02d}.jsonl"))]
    assert [(a["id"], a["prediction"]) for a in map(json.loads, open(answers))] == want


# The merged folder with transformers alone (no pilot_hpc on the path): the stock class,
# the folder's own chat template and image processor.
_STOCK = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("pilot_hpc") is None, "pilot_hpc is importable"
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
folder, data, root = sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
tok, proc = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
out = []
#MODEL_INPUTS#
for rec in data:
    q = rec["conversations"][0]["value"].replace("<image>", "").strip()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids, px = model_inputs(model, tok, proc, Image.open(f"{root}/{rec['image']}").convert("RGB"), text)
    with torch.no_grad():
        gen = model.generate(**ids, **px, max_new_tokens=int(sys.argv[5]), do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out.append([rec["id"], tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()])
print(json.dumps(out))
"""

# What each family's processor does with one image and the chat template's text.
_QWEN_INPUTS = r"""
def model_inputs(model, tok, proc, image, text):
    px = proc(images=[image], return_tensors="pt")
    n = int(px["image_grid_thw"].prod()) // proc.merge_size ** 2
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    # What the processor returns beside input_ids: where the image tokens are (M-RoPE).
    ids["mm_token_type_ids"] = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    return ids, px
"""
_INTERNVL_INPUTS = r"""
def model_inputs(model, tok, proc, image, text):
    # InternVLProcessor's expansion: the image's tiles (crop_to_patches, the processor's
    # default), image_seq_length context tokens each, between <img> and </img>.
    px = proc(images=[image], crop_to_patches=True, return_tensors="pt")
    n = int(px.pop("num_patches")[0]) * model.config.image_seq_length
    ids = tok(text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n + "</img>"), return_tensors="pt")
    return ids, px
"""
# The any-resolution families: the image's placeholder count is the length of the
# features the model itself packs for it (get_image_features).
_ANYRES_INPUTS = r"""
def model_inputs(model, tok, proc, image, text):
    px = proc(images=[image], return_tensors="pt")
    px = {"pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}
    with torch.no_grad():
        n = model.model.get_image_features(**px).pooler_output[0].shape[0]
    return tok(text.replace("<image>", "<image>" * n), return_tensors="pt"), px
"""
MODEL_INPUTS = {"qwen2_5_vl": _QWEN_INPUTS, "qwen2_vl": _QWEN_INPUTS, "internvl": _INTERNVL_INPUTS,
                "llava_onevision": _ANYRES_INPUTS, "llava_next": _ANYRES_INPUTS}


def test_merged_fedavg_folder_loads_with_transformers_alone(family_runs, small_world):
    import site

    from pilot_hpc.metrics.generation import read_predictions

    family, out, runs = family_runs
    folder = out / "export_fedavg"
    if not folder.is_dir():  # exported here (pilot_hpc.export), then read without pilot_hpc
        proc = subprocess.run([sys.executable, "-m", "pilot_hpc.export", "--run", str(runs["fedavg"]), "--client",
                               "0", "--out", str(folder)], capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
    data = os.path.join(small_world[1], "client_00_eval.json")
    script = _STOCK.replace("#MODEL_INPUTS#", MODEL_INPUTS[family])
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, site.getsitepackages()[0], str(folder / "merged"),
                           data, small_world[1], "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = load_metrics(runs["fedavg"])["rounds"][-1]["round"]
    want = [[p["id"], p["prediction"]] for p in read_predictions(
        os.path.join(str(runs["fedavg"]), "predictions", f"round_{last:03d}", "client_00.jsonl"))]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want
