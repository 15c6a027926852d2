"""LLaVA-1.5-7B with the Pilot connector and LoRA on the meta device: parameter and byte
counts per client per stage, without weights or memory; with --config, the memory plan
of one client of that config (pilot_hpc/memory.py) and whether it fits --gpu-mem-gb, then
(Pilot) the CT-MoA kernel's GEMMs and tiles at its connector (tools/kernel_plan.py).

    python -m pilot_hpc.tools.dryrun [--lora-r 64] [--tasks 3] [--clients 9] [--dtype bfloat16]
    python -m pilot_hpc.tools.dryrun --config CONFIG [--gpu-mem-gb N] [section.key=value ...]

Exit code with --gpu-mem-gb: 0 fits, 1 does not fit, 2 a bad config.

Sizes are LLaVA-1.5-7B's (CLIP ViT-L/14-336 and Vicuna-7B v1.5, as in llava-1.5-7b-hf).
"trainable" counts what the optimiser updates in a stage; "forward" what the connector
and LoRA compute with; "sent" what a client puts on the wire each round (Pilot: the
task adapter / own expert and the LoRA).
"""

from __future__ import annotations

import argparse
import sys

import torch
from pilot_hpc.config import ModelConfig, PilotConfig, load_config
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.model.ct_clip import ct_clip_counts
from pilot_hpc.model import families
from pilot_hpc.model.build import PilotModel, attach_pilot, quiet_checkpointing_deprecation


def count(params) -> int:
    return sum(p.numel() for p in params)


def report(lora_r: int, lora_alpha: int, num_tasks: int, num_clients: int, dtype: str) -> str:
    m = ModelConfig(lora_r=lora_r, lora_alpha=lora_alpha, dtype=dtype)
    with torch.device("meta"):
        model = families.DEFAULT.from_config(families.DEFAULT.reference_config())
        peft_model, connector = attach_pilot(model, m, num_tasks, 0, seed=0, pilot=PilotConfig())
    pm = PilotModel(peft_model, connector, None, None, 576)
    pilot = get_strategy("pilot", load_config(None))
    bytes_per = torch.finfo(getattr(torch, dtype)).bits // 8
    lora = count(p for _, p in pm.lora_named_parameters())
    adapter = count(connector.task_adapter.parameters())
    sent = count(pilot.policy.shared_params(pm)) + count(pilot.policy.personal_params(pm))
    lines = [f"LLaVA-1.5-7B + Pilot connector + LoRA r={lora_r} ({num_tasks} tasks, {num_clients} clients, {dtype})",
             f"  base model (frozen, never sent):  {count(model.parameters()) - lora - count(connector.parameters()) + adapter:>14,}",
             f"  one adapter (projector shape):    {adapter:>14,}",
             f"  LoRA on every LLM linear:         {lora:>14,}"]
    for stage in (1, 2):
        pm.set_stage(stage)
        trainable = count(p for p in peft_model.parameters() if p.requires_grad)
        forward = lora + (2 * adapter if stage == 1 else (2 * num_tasks - 1) * adapter
                          + connector.router.weight.numel())
        lines.append(f"  stage {stage}: trainable {trainable:>14,}   forward (connector + LoRA) {forward:>14,}")
    lines += [f"  sent per client per round:        {sent:>14,}  ({sent * bytes_per / 2**30:.2f} GiB in {dtype})",
              f"  into rank 0 per round ({num_clients} clients): {num_clients * sent * bytes_per / 2**30:.2f} GiB; "
              f"back out: {num_tasks} task adapters + {num_clients} LoRAs = "
              f"{(num_tasks * adapter + num_clients * lora) * bytes_per / 2**30:.2f} GiB"]
    return "\n".join(lines + ct_clip_lines(m, num_tasks, sent, bytes_per, dtype))


def ct_clip_lines(m: ModelConfig, num_tasks: int, sent: int, bytes_per: int, dtype: str) -> list[str]:
    """What CT-CLIP (pilot.ct_clip) adds: activated and communicated parameters (the
    paper's Table 4 reports +1.25B activated, +0.2B communicated)."""
    with torch.device("meta"):
        model = families.DEFAULT.from_config(families.DEFAULT.reference_config())
        peft_model, connector = attach_pilot(model, m, num_tasks, 0, seed=0, pilot=PilotConfig(ct_clip=True))
    pm = PilotModel(peft_model, connector, None, None, 576)
    pilot = get_strategy("pilot", load_config(None, ["pilot.ct_clip=true"]))
    sent_ct = count(pilot.policy.shared_params(pm)) + count(pilot.policy.personal_params(pm))
    extra = ct_clip_counts(families.DEFAULT.vision_tower(pm.model), num_tasks)
    pm.set_stage(2)
    trainable = count(p for p in peft_model.parameters() if p.requires_grad)
    return [f"  with CT-CLIP (pilot.ct_clip=true, {len(pm.clip_mlps)} CLIP MLPs):",
            f"    sent per client per round:      {sent_ct:>14,}  (+{sent_ct - sent:,}; "
            f"{sent_ct * bytes_per / 2**30:.2f} GiB in {dtype})",
            f"    stage 2: trainable {trainable:>14,}   activated by CLIP's mixtures "
            f"+{extra['activated']:,} (2T-1 = {2 * num_tasks - 1} copies of the MLPs and the routers)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.dryrun", description=__doc__.split("\n")[0])
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--clients", type=int, default=9)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--config", default=None, help="YAML config: print one client's memory plan")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="device memory (GB, 1e9 bytes): fits or not")
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of --config")
    a = ap.parse_args(argv)
    quiet_checkpointing_deprecation()
    if a.config is None:
        if a.overrides or a.gpu_mem_gb is not None:
            ap.error("--gpu-mem-gb and overrides need --config")
        print(report(a.lora_r, a.lora_alpha, a.tasks, a.clients, a.dtype))
        return 0
    from pilot_hpc.config import ConfigError
    from pilot_hpc import memory

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as err:
        print(f"dryrun: config error: {err}", file=sys.stderr)
        return 2
    text, fits = memory.report(cfg, a.gpu_mem_gb)
    print(text)
    if cfg.fl.strategy == "pilot":
        from pilot_hpc.tools import kernel_plan

        print(kernel_plan.report(cfg))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
