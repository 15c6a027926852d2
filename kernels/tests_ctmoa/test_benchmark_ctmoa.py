"""The benchmark of pilot_hpc_kernels.benchmark_ctmoa at tiny sizes (every variant runs; its
CLI without a GPU writes the cost model) and its cost model against hand counts and the
launches the fused path really makes. No test asserts a speed."""

from __future__ import annotations

import math

import pytest
import torch

from pilot_hpc_kernels.benchmark_ctmoa import (LLAVA_7B, TINY, Shape, build, cost_model, eager_flops, main,
                                               render_markdown, run, saved_bytes)

from .test_ctmoa import needs_kernels


def _pytest_shape_device() -> tuple[Shape, str]:
    # Small on a GPU too: the suite checks that the benchmark runs, the CLI measures.
    if torch.cuda.is_available():
        return Shape(batch=2, tokens=64, cv=128, c=192, t=3, dtype=torch.bfloat16), "cuda"
    return TINY, "cpu"


@needs_kernels
def test_benchmark_all_variants_run():
    shape, device = _pytest_shape_device()
    results = run(shape, device, reps=5)
    assert [r.name for r in results][:2] == ["fused (Triton)", "eager reference"] and len(results) == 4
    for r in results:
        assert all(math.isfinite(x) and x > 0 for x in (r.fwd_ms, r.bwd_ms, r.both_ms)), r
    text = render_markdown(results, shape, device, "pytest", judge=False)
    assert "| fused (Triton) |" in text and "Targets:" in text


def test_benchmark_cli_without_gpu_writes_the_cost_model(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CLI would run the full benchmark")
    out = tmp_path / "B.md"
    assert main(["--out", str(out)]) == 0
    assert "cost model only" in capsys.readouterr().err
    text = out.read_text()
    assert "No GPU has run this benchmark" in text and "TFLOP/s and no measured" in text
    assert "| forward + backward | 4,020.2 | 4,020.2 |" in text  # the 7B figures, fused = eager
    assert "| MB | 377.6 | 1,208.1 | 0.31x |" in text


def test_cost_model_at_the_7b_shapes():
    """Hand-counted at M = 9216, Cv = 1024, C = 4096, T = 3, bf16: GEMM FLOPs of the
    fused forward + backward at most eager's, kept memory at most half of eager's."""
    costs = cost_model(LLAVA_7B)
    fwd = sum(x.flops for x in costs if x.phase == "fwd")
    bwd = sum(x.flops for x in costs if x.phase == "bwd")
    m, cv, c = 9216, 1024, 4096
    mlp = 2 * m * cv * c + 2 * m * c * c  # one MLP's two forward GEMMs
    assert fwd == 5 * mlp + 2 * m * 3 * cv
    assert bwd == 3 * (4 * m * c * c + 2 * m * cv * c) + 2 * m * 3 * cv  # D, dW2, dW1 of 3 MLPs; dW_r
    eager = eager_flops(LLAVA_7B)
    assert fwd + bwd <= eager["fwd"] + eager["bwd"]
    mem = saved_bytes(LLAVA_7B)
    assert mem["fused"] == 5 * m * c * 2 + m * 16 and mem["fused"] <= 0.5 * mem["eager"]


@needs_kernels
def test_cost_model_matches_the_launches():
    """Every launch the fused forward + backward makes (recorded by the launchers with
    its grid and GEMM sizes) is in the cost model, with the same m x n x k and count;
    each Triton grid covers its GEMM's m x n output with the tile it used."""
    import triton
    from pilot_hpc_kernels import ctmoa, ctmoa_fwd
    for h_grad, n in ((False, 0), (True, 0), (False, 11), (True, 26)):  # N = C, N < C, N > C
        shape = Shape(batch=1, tokens=21, cv=20, c=18, t=3, dtype=torch.float32, n_out=n)
        h, wr, adapters, eo = build(shape, "cpu")
        h.requires_grad_(h_grad)
        ctmoa_fwd.LAUNCHES = []
        try:
            res = ctmoa.ctmoa_triton(h, wr, adapters, eo)
            params = [x for x in [h, wr] + [x for a in adapters for x in a] if x.requires_grad]
            torch.autograd.grad([res.out.sum(), res.stats.lse_sq_sum], params)
            launches = ctmoa_fwd.LAUNCHES
        finally:
            ctmoa_fwd.LAUNCHES = None
        got = {}
        for x in launches:
            key = (x.name, x.m, x.n, x.k)
            got[key] = got.get(key, 0) + 1
            if x.tile is not None:
                assert x.grid == (triton.cdiv(x.m, x.tile.bm) * triton.cdiv(x.n, x.tile.bn),), x
        costs = cost_model(shape, h_grad=h_grad)
        want = {(x.name, x.m, x.n, x.k): x.count for x in costs}
        assert got == want, (h_grad, got, want)
        eager = eager_flops(shape, h_grad=h_grad)
        assert sum(x.flops for x in costs) <= eager["fwd"] + eager["bwd"]
