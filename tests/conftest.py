"""Shared fixtures: a small synthetic world and its tiny base model, built once per session;
and the markers unit / mpi / e2e, given by the folder a test lives in."""

from __future__ import annotations

import os

import pytest

_FOLDER_MARKS = {"unit": "unit", "mpi": "mpi", "e2e": "e2e"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            parts = item.path.relative_to(config.rootpath).parts
        except ValueError:  # a test outside the repository
            continue
        folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
        if folder in _FOLDER_MARKS:
            item.add_marker(_FOLDER_MARKS[folder])

from helpers import CHUNK_MB, SMOKE, run_main, small_overrides


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pilot_cache"))


@pytest.fixture(scope="session")
def small_world(cache_dir):
    """(config, synthetic data folder, base model folder) for the small federation."""
    from pilot_hpc.config import load_config
    from pilot_hpc.data import synthetic
    from pilot_hpc.train.warm_start import ensure_base

    cfg = load_config(SMOKE, small_overrides(cache_dir, os.path.join(cache_dir, "unused")))
    spec = synthetic.spec_for(cfg)
    folder = synthetic.ensure(spec, cache_dir)
    base = ensure_base(cfg, folder, spec.key())
    return cfg, folder, base



@pytest.fixture(scope="session")
def runs(small_world, cache_dir, tmp_path_factory):
    """The small federation run uninterrupted, once with W = 1 (unchunked) and once under
    mpiexec -n 3 with a streamed exchange in several chunks."""
    out = tmp_path_factory.mktemp("fed")
    one = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(out / "w1")), timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    three = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(out / "w3")) + [f"fl.chunk_mb={CHUNK_MB}"],
                     np=3, timeout=600)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    return out, one, three
