"""A CT-CLIP federation: the streamed, chunked exchange under mpiexec -n 3 gives the
same results as one process with unchunked aggregation (bitwise)."""

from helpers import CHUNK_MB, SMOKE, load_metrics, run_main, small_overrides


def test_ct_clip_runs_alike_unchunked_on_one_rank_and_chunked_on_three(small_world, cache_dir, tmp_path):
    args = ["--config", SMOKE] + small_overrides(cache_dir, "x") + ["pilot.ct_clip=true"]
    one = run_main(args + [f"run.output_dir={tmp_path / 'w1'}", "fl.chunk_mb=0"], timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    three = run_main(args + [f"run.output_dir={tmp_path / 'w3'}", f"fl.chunk_mb={CHUNK_MB}"], np=3, timeout=600)
    assert three.returncode == 0, three.stderr[-3000:]
    a, b = load_metrics(tmp_path / "w1"), load_metrics(tmp_path / "w3")
    assert a["final"] == b["final"] and a["rounds"] == b["rounds"]
    assert len(a["rounds"]) == 3  # round 0 + stage 1 + stage 2: both stages exchanged CLIP's adapters
