"""Nothing a run wrote is overwritten by a later run that did not resume it: a folder
holding another configuration's checkpoints is refused before any shape check, a
start-over moves the earlier files aside, and an unusable file is kept as evidence."""

import hashlib
import os

import pytest
import torch

from helpers import SMOKE
from pilot_hpc import checkpoint
from pilot_hpc.checkpoint import resume
from pilot_hpc.checkpoint.store import ClientCheckpoint
from pilot_hpc.config import ConfigError, load_config

SMALL = ["fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]", "pilot.top_m=1", "fl.rounds=2"]


def finished_run(out, cfg, lora_r=8):
    """The files a 2-round run of `cfg` leaves in `out` (clients with LoRA of rank lora_r)."""
    folder = resume.folder_of(cfg)
    os.makedirs(folder)
    state = {"lora.a": torch.ones(lora_r, 16), "connector.router.weight": torch.zeros(3, 4)}
    for round_ in (1, 2):
        final = os.path.join(folder, checkpoint.file_name(round_, True))
        checkpoint.create(final + ".tmp", cfg, round_, complete=True, history=[], server={})
        checkpoint.append_clients(final + ".tmp", {k: ClientCheckpoint(task=t, num_samples=5, state=dict(state))
                                                  for k, t in enumerate(cfg.fl.client_tasks)})
        checkpoint.finalize(final + ".tmp", final)
    (out / "metrics.json").write_text('{"final": {}}')
    (out / "results.md").write_text("# table\n")
    os.makedirs(out / "predictions" / "round_002")
    (out / "predictions" / "round_002" / "client_00.jsonl").write_text("{}\n")
    return {"lora.a": (lora_r, 16), "connector.router.weight": (3, 4)}


def digests(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("change, fields", [
    (["model.lora_r=4"], ["model.lora_r: 8 -> 4"]),
    (["fl.num_clients=4", "fl.client_tasks=[vqa, caption, grounding, vqa]"], ["fl.num_clients: 3 -> 4"]),
])
def test_another_configs_checkpoints_are_refused_before_any_shape_check(tmp_path, change, fields):
    old = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}"])
    finished_run(tmp_path, old)
    before = digests(tmp_path)
    new = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}"] + change)
    # The new model's shapes differ too (rank 4): the shape check alone would call both
    # files unusable and start over over them.
    expected = {"lora.a": (new.model.lora_r, 16), "connector.router.weight": (3, 4)}
    with pytest.raises(ConfigError) as err:
        resume._start_point(new, new.fl.num_clients, expected)
    for f in fields:
        assert f in str(err.value)
    assert "run.restart=true" in str(err.value) and "another run.output_dir" in str(err.value)
    assert digests(tmp_path) == before  # byte-identical, nothing moved


def test_restart_moves_the_earlier_run_aside_byte_for_byte(tmp_path):
    old = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}"])
    finished_run(tmp_path, old)
    before = digests(tmp_path)
    new = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}", "model.lora_r=4", "run.restart=true"])
    assert resume._start_point(new, 3, {"lora.a": (4, 16), "connector.router.weight": (3, 4)}) == (-1, 0)
    (moved,) = os.listdir(tmp_path / resume.PREVIOUS)
    assert digests(tmp_path / resume.PREVIOUS / moved) == before
    assert not any((tmp_path / name).exists() for name in resume.RUN_OUTPUTS)
    # A second start-over keeps the first one's files too.
    finished_run(tmp_path, new, lora_r=4)
    resume._start_point(new, 3, {"lora.a": (4, 16), "connector.router.weight": (3, 4)})
    assert len(os.listdir(tmp_path / resume.PREVIOUS)) == 2


def test_resume_never_also_keeps_the_earlier_files(tmp_path):
    cfg = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}", "run.resume=never"])
    finished_run(tmp_path, cfg)
    before = digests(tmp_path)
    assert resume._start_point(cfg, 3, {}) == (-1, 0)
    (moved,) = os.listdir(tmp_path / resume.PREVIOUS)
    assert digests(tmp_path / resume.PREVIOUS / moved) == before


def test_an_unusable_newest_checkpoint_is_kept_aside_not_overwritten(tmp_path):
    cfg = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}"])
    expected = finished_run(tmp_path, cfg)
    newest = os.path.join(resume.folder_of(cfg), "round_002.h5")
    with open(newest, "r+b") as fh:
        fh.truncate(os.path.getsize(newest) // 2)
    damaged = open(newest, "rb").read()
    assert resume._start_point(cfg, 3, expected) == (1, 1)
    assert not os.path.exists(newest)  # redoing round 2 cannot overwrite it ...
    kept = os.path.join(resume.folder_of(cfg), resume.UNUSABLE, "round_002.h5")
    assert open(kept, "rb").read() == damaged  # ... it is here, as it was found
    assert (tmp_path / "metrics.json").exists()  # a resume moves nothing else


def test_none_usable_starts_over_with_everything_moved_aside(tmp_path):
    cfg = load_config(SMOKE, SMALL + [f"run.output_dir={tmp_path}"])
    finished_run(tmp_path, cfg)
    before = digests(tmp_path)
    # Same config, but the model's keys changed (e.g. another pilot_hpc version).
    assert resume._start_point(cfg, 3, {"other.key": (1,)}) == (-1, 0)
    (moved,) = os.listdir(tmp_path / resume.PREVIOUS)
    after = digests(tmp_path / resume.PREVIOUS / moved)
    assert sorted(after.values()) == sorted(before.values())
