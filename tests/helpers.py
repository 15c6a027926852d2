"""Helpers shared by the tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke_9client.yaml")
# The W = 3 run of the `runs` fixture streams the exchange in chunks of this many MiB
# (16384 float32 columns: the small world's parts take 2 and 3 chunks), while the
# W = 1 run sends each part whole.
CHUNK_MB = 0.0625


def small_overrides(cache_dir: str, output_dir: str) -> list[str]:
    """A 3-client federation (one client per task) that runs in seconds on a CPU."""
    return [
        f"run.cache_dir={cache_dir}", f"run.output_dir={output_dir}",
        "fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]", "pilot.top_m=1", "fl.rounds=2",
        "data.train_min=24", "data.train_max=40", "data.eval_samples=6",
        "pretrain.steps=10", "pretrain.samples=60",
        "train.max_steps=3", "train.batch_size=8", "train.eval_batch_size=8", "train.max_new_tokens=12",
    ]



def mpiexec() -> str:
    from pilot_hpc.tools.mpiexec import find_mpiexec

    try:
        return find_mpiexec()
    except RuntimeError as err:
        pytest.fail(str(err))


def run_main(args: list[str], np: int | None = None, timeout: int = 600, cwd: str = REPO,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m pilot_hpc.main as a subprocess, under `mpiexec -n np` when np is given."""
    cmd = [sys.executable, "-m", "pilot_hpc.main"] + args
    if np is not None:
        cmd = [mpiexec(), "-n", str(np)] + cmd
    full_env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout), **(env or {}))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout + 30, env=full_env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A run that must have succeeded (its output's tails in the failure message)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_metrics(folder) -> dict:
    """A run's metrics.json as the project reads it back: null (no value) as NaN."""
    from pilot_hpc.report import read_metrics

    return read_metrics(os.path.join(str(folder), "metrics.json"))


def run_mpi_check(script: str, ranks: int, timeout: int = 240) -> None:
    """`mpiexec -n ranks python tests/<script>`: every rank must exit 0 and print `rank R: ok`."""
    import re

    proc = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, os.path.join(REPO, "tests", "mpi", script)],
                          capture_output=True, text=True, timeout=timeout + 30,
                          env=dict(os.environ, MPIEXEC_TIMEOUT=str(timeout)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Ranks print concurrently and mpiexec may join their lines: find the marks, not lines.
    assert sorted(int(r) for r in re.findall(r"rank (\d+): ok", proc.stdout)) == list(range(ranks)), proc.stdout


def args_for(cache_dir, out) -> list[str]:
    """pilot_hpc.main arguments of the small federation writing to `out`."""
    return ["--config", SMOKE] + small_overrides(cache_dir, str(out))


def assert_same_result(out, runs):
    """The run in `out` ended with the uninterrupted W = 3 run's metrics (the `runs` fixture)."""
    ref = load_metrics(runs[0] / "w3")
    got = load_metrics(out)
    assert got["final"] == ref["final"]
    assert got["rounds"] == ref["rounds"]


def build_client(small_world, *, client: int = 0, **model):
    """(PilotModel at stage 1, client `client`'s training set, its round-start state) of
    the small world, with `model` fields (e.g. lora_dropout, dtype) replaced."""
    import dataclasses

    import torch

    from pilot_hpc.data.records import InstructionDataset, load_records
    from pilot_hpc.data.synthetic import client_files
    from pilot_hpc.model.llava import build_pilot_model

    cfg, folder, base = small_world
    m = dataclasses.replace(cfg.model, **model)
    pm = build_pilot_model(base, m, 3, client, seed=0, device=torch.device("cpu"))
    ds = InstructionDataset(load_records(client_files(folder, 3)[0][client]), pm.tokenizer, pm.image_processor,
                            pm.num_image_tokens, cfg.data.max_length)
    pm.set_stage(1)
    return pm, ds, pm.get_state()


def trainable(pm):
    """Every trainable parameter of the model, flattened into one tensor (a copy)."""
    import torch

    return torch.cat([p.detach().flatten().clone() for p in pm.model.parameters() if p.requires_grad])


def update_error(a, b, start) -> float:
    """Relative error of a round's update: ||a - b|| / ||b - start||."""
    return float((a - b).norm() / (b - start).norm())


def llava_json_args(small_world, out, train_files):
    """The real-data path: a local HF LLaVA folder (model.path) and LLaVA JSON files."""
    cfg, folder, base = small_world
    from pilot_hpc.data.synthetic import client_files

    _, evals = client_files(folder, 3)
    return ["--config", SMOKE] + small_overrides(cfg.run.cache_dir, str(out)) + [
        "data.kind=llava_json", f"model.path={base}", f"data.image_root={folder}",
        f"data.train_files=[{', '.join(train_files)}]", f"data.eval_files=[{', '.join(evals)}]"]


def task_world(tasks: list[int], *extra: str):
    """A config whose K = len(tasks) clients have these task ids (0 vqa, 1 caption,
    2 grounding), with only the tasks used, M = 1 unless `extra` says otherwise."""
    from pilot_hpc.config import DEFAULT_TASK_METRICS, load_config

    names = list(DEFAULT_TASK_METRICS)
    client_tasks = [names[t] for t in tasks]
    used = {n: DEFAULT_TASK_METRICS[n] for n in names if n in client_tasks}
    return load_config(None, [f"fl.num_clients={len(tasks)}", f"fl.client_tasks=[{', '.join(client_tasks)}]",
                              f"fl.task_metrics={used}", "pilot.top_m=1"] + list(extra))
