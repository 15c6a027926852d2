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


def test_a_ct_clip_client_exports_with_its_clip_mlps(small_world, cache_dir, tmp_path):
    """export + load_client keep CT-CLIP's MLP connectors: the loaded model answers its
    evaluation split exactly as the run's last predictions file says."""
    import torch

    from pilot_hpc.checkpoint import read
    from pilot_hpc.data.synthetic import client_files
    from pilot_hpc.export import export_client, load_client
    from pilot_hpc.generate import answer_file
    from pilot_hpc.metrics.generation import read_predictions
    from pilot_hpc.model.connector import PilotConnector

    run = tmp_path / "run"
    proc = run_main(["--config", SMOKE] + small_overrides(cache_dir, str(run)) + ["pilot.ct_clip=true", "fl.rounds=1"],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_client(str(run), 0, str(tmp_path / "export"))
    model = load_client(str(tmp_path / "export"))
    clip = [m for m in model.model.vision_tower.modules() if isinstance(m, PilotConnector)]
    state = read(str(run / "checkpoints" / "round_001.h5"), clients=[0]).clients[0].state
    assert len(clip) == small_world[0].model.vision_layers
    for i, m in enumerate(clip):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[f"ct_clip.{i}.{k}"].to(v.dtype)), (i, k)
    gen = model.pilot_export["generation"]
    got = answer_file(model, client_files(small_world[1], 3)[1][0], None, gen["batch_size"], gen["max_new_tokens"],
                      "cpu")
    want = read_predictions(str(run / "predictions" / "round_001" / "client_00.jsonl"))
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
