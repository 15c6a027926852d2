"""The fused CT-MoA kernel at a config's connector: the MLPs' sizes (Cv -> C -> N), the
GEMMs of one stage-2 micro-batch (M = images x visual tokens, from the memory planner's
plan of the config), their FLOPs, what the forward keeps for the backward (fused against
eager autograd), and the tile each Triton launch takes on an sm_90 GPU with the number of
tiles and waves over its SMs. Analytic: no GPU runs here, and none of it is a timing.

    python -m pilot_hpc.tools.kernel_plan --config configs/qwen2_5_vl_7b_visual_9client.yaml [key=value ...]

`python -m pilot_hpc.tools.dryrun --config ...` prints the same section after the memory plan.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.model.families import DTYPES

H100_SMS = 132  # H100 SXM and H200: the waves below are counted on them
# launch name (as the launchers record it) -> its tile table row in ctmoa_fwd
KINDS = {"up": "up", "up frozen": "up", "down frozen Y": "down", "down mix": "down", "bwd D": "bwd"}


def kernel_shape(a, images: int, num_tasks: int, dtype: torch.dtype):
    """benchmark_ctmoa.Shape of one micro-batch at the connector of memory.Arch `a`."""
    from pilot_hpc_kernels.benchmark_ctmoa import Shape

    return Shape(batch=images, tokens=a.image_tokens, cv=a.vision_hidden, c=a.connector_mid, t=num_tasks,
                 dtype=dtype, n_out=a.hidden)


def _tiles(kind: str, dtype: torch.dtype, m: int):
    try:
        from pilot_hpc_kernels.ctmoa_fwd import gpu_tile
    except ImportError:  # no triton on this machine: the table says so
        return None
    return gpu_tile(kind, dtype, m)


def lines_for(a, images: int, num_tasks: int, dtype: torch.dtype) -> list[str]:
    from pilot_hpc_kernels.benchmark_ctmoa import cost_model, eager_flops, saved_bytes

    shape = kernel_shape(a, images, num_tasks, dtype)
    costs = cost_model(shape)
    fused = sum(x.flops for x in costs)
    eager = sum(eager_flops(shape).values())
    mem = saved_bytes(shape)
    name = str(dtype).replace("torch.", "")
    out = [f"CT-MoA kernel at this connector (stage 2, T = {num_tasks}: {2 * num_tasks - 1} MLPs "
           f"{shape.cv} -> {shape.c} -> {shape.n}, {name}), one micro-batch of {images} image(s) x "
           f"{shape.tokens} visual tokens = M {shape.m}; analytic, no timing:",
           f"  GEMM GFLOP forward + backward: fused {fused / 1e9:,.1f}, eager {eager / 1e9:,.1f}; kept for the "
           f"backward: fused {mem['fused'] / 2**20:,.1f} MiB, eager {mem['eager'] / 2**20:,.1f} MiB "
           f"({mem['fused'] / mem['eager']:.2f}x)",
           f"  {'launch':<15}{'GEMM m x n x k':>24}{'count':>7}{'GFLOP':>10}   tile (BM x BN x BK, warps, stages)"
           f"{'tiles':>8}{'waves on ' + str(H100_SMS) + ' SMs':>18}"]
    for x in costs:
        kind = KINDS.get(x.name)
        tile = _tiles(kind, dtype, x.m) if kind else None
        if kind is None:
            desc, tiles, waves = "torch.matmul" if x.name.startswith("torch") else "fixed small tile", "", ""
        elif tile is None:
            desc, tiles, waves = "(triton not installed)", "", ""
        else:
            n_tiles = -(-x.m // tile.bm) * -(-x.n // tile.bn)
            desc = f"{tile.bm} x {tile.bn} x {tile.bk}, {tile.warps}, {tile.stages}"
            tiles, waves = f"{n_tiles:,}", f"{n_tiles / H100_SMS:.2f}"
        gemm = f"{x.m} x {x.n} x {x.k}"
        out.append(f"  {x.name:<15}{gemm:>24}{x.count:>7}{x.flops / 1e9:>10,.1f}   {desc:<34}{tiles:>8}{waves:>18}")
    return out


def report(cfg) -> str:
    """The section for one config: its model's connector at its planned micro-batch."""
    from pilot_hpc import memory

    config, source = memory.model_config(cfg)
    a = memory.llava_arch(config, source)
    t = cfg.train
    params = memory.parameter_bytes(cfg, config)
    est = memory.estimate(cfg, a, params, checkpointing=t.gradient_checkpointing, accum=t.grad_accum_steps)
    return "\n".join(lines_for(a, est.micro_batch, len(cfg.tasks), DTYPES[cfg.model.dtype]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.kernel_plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (its model, tasks, batch and dtype)")
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of --config")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"kernel_plan: config error: {err}", file=sys.stderr)
        return 2
    print(report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
