"""Shared fixtures: a small synthetic world and its tiny base model, built once per session
(once for all pytest-xdist workers); and the markers unit / mpi / e2e, given by the folder
a test lives in."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess

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


def _session_root(tmp_path_factory):
    """A folder shared by the whole test session: under pytest-xdist (make test runs the
    test files on several workers) each worker has its own basetemp, whose parent is the
    session's; without xdist, the basetemp itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _only_one(root, name):
    """An exclusive lock over the session's workers: one builds, the others wait and reuse."""
    with open(root / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    # One cache for every worker: the tiny models and data it holds are written atomically
    # (temp folder + rename, the loser of a race keeps the winner's), so workers share them.
    path = _session_root(tmp_path_factory) / "pilot_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def small_world(cache_dir, tmp_path_factory):
    """(config, synthetic data folder, base model folder) for the small federation."""
    from pilot_hpc.config import load_config
    from pilot_hpc.data import synthetic
    from pilot_hpc.train.warm_start import ensure_base

    with _only_one(_session_root(tmp_path_factory), "small_world"):
        cfg = load_config(SMOKE, small_overrides(cache_dir, os.path.join(cache_dir, "unused")))
        spec = synthetic.spec_for(cfg)
        folder = synthetic.ensure(spec, cache_dir)
        base = ensure_base(cfg, folder, spec.key())
    return cfg, folder, base


def _run_once(out, args, **kw) -> subprocess.CompletedProcess:
    """run_main into `out` unless a worker already did (its output kept beside the run)."""
    done = out.parent / f"{out.name}.proc.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        return subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])
    proc = run_main(args, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                "stderr": proc.stderr}))
    return proc


@pytest.fixture(scope="session")
def runs(small_world, cache_dir, tmp_path_factory):
    """The small federation run uninterrupted, once with W = 1 (unchunked) and once under
    mpiexec -n 3 with a streamed exchange in several chunks (once per session, whatever
    the workers)."""
    root = _session_root(tmp_path_factory)
    out = root / "fed"
    out.mkdir(exist_ok=True)
    with _only_one(root, "fed"):
        one = _run_once(out / "w1", ["--config", SMOKE] + small_overrides(cache_dir, str(out / "w1")), timeout=600)
        three = _run_once(out / "w3", ["--config", SMOKE] + small_overrides(cache_dir, str(out / "w3")) +
                          [f"fl.chunk_mb={CHUNK_MB}"], np=3, timeout=600)
    return out, one, three
