"""The README's real-data walk-through on its fixtures: the five benchmarks in their
download layouts (tests/official_formats.py), prepare's visual scenario, a model folder
written by the installed transformers' save_pretrained (scripts/tiny_llava_folder.py),
and the shipped paper config run on them with its overlay, unedited."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

from helpers import REPO, load_metrics, run_main
from official_formats import prepare_argv, write_all
from pilot_hpc.data import prepare


def _tiny_llava_folder():
    spec = importlib.util.spec_from_file_location("tiny_llava_folder",
                                                  os.path.join(REPO, "scripts", "tiny_llava_folder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_official_downloads_to_a_finished_run(tmp_path, capsys):
    files = write_all(tmp_path / "downloads")
    data = tmp_path / "data" / "fedmit_visual"
    assert prepare.main(prepare_argv("visual", files, data)) == 0
    assert "wrote 9 clients' files and overlay.yaml" in capsys.readouterr().out
    model = tmp_path / "llava-tiny"
    assert _tiny_llava_folder().main([str(model), "--text"] + sorted(glob.glob(str(data / "client_*.json")))) == 0
    # What transformers 5's LlavaProcessor.save_pretrained writes: no preprocessor_config.json.
    assert (model / "processor_config.json").is_file() and not (model / "preprocessor_config.json").exists()

    out = tmp_path / "run"
    proc = run_main(["--config", os.path.join(REPO, "configs", "fedmit_visual_9client.yaml"),
                     "--config", str(data / "overlay.yaml"), f"model.path={model}", "run.device=cpu",
                     "model.dtype=float32", f"run.output_dir={out}", "fl.rounds=1", "data.num_workers=0",
                     "train.max_new_tokens=4"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = load_metrics(out)["final"]
    tasks = ["gqa"] * 3 + ["coco"] * 3 + ["refcoco"] * 3
    assert [(row["client"], row["task"]) for row in final] == list(enumerate(tasks))
    assert all(row["steps"] >= 1 for row in final)  # every client trained in round 1
    for k in range(9):
        evaluated = len(json.load(open(data / f"client_{k:02d}_eval.json")))
        for r in (0, 1):
            lines = (out / "predictions" / f"round_{r:03d}" / f"client_{k:02d}.jsonl").read_text().splitlines()
            assert len(lines) == evaluated, (k, r)
