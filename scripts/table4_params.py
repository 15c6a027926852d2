"""Table 4's parameter columns on the research world's tiny LLaVA: activated (AP) and
communicated (CP) parameters of one client in stage 2, Pilot with and without CT-CLIP.

    python scripts/table4_params.py [configs/synthetic_fedmit.yaml]

AP counts what a forward runs through beyond the frozen base model: the connector's
mixture (2T - 1 adapters and the router), the LoRA, and with CT-CLIP every CLIP MLP's
mixture (model.ct_clip.ct_clip_counts). CP is what one client sends per round (the
Pilot strategy's visual and text parameters). Builds (or reuses) the seed-0 base model
of the config, as a run does.
"""

import sys

import torch

from pilot_hpc.config import load_config
from pilot_hpc.data import synthetic
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.model.ct_clip import ct_clip_counts
from pilot_hpc.model.llava import build_pilot_model
from pilot_hpc.train.warm_start import ensure_base


def count(params) -> int:
    return sum(p.numel() for p in params)


def main(path: str) -> None:
    print("| | AP (activated, stage 2) | CP (sent per client per round) | all parameters |")
    print("|---|---|---|---|")
    for ct in (False, True):
        cfg = load_config(path, [f"pilot.ct_clip={str(ct).lower()}", "fl.strategy=pilot"])
        spec = synthetic.spec_for(cfg)
        base = ensure_base(cfg, synthetic.ensure(spec, cfg.run.cache_dir), spec.key())
        pm = build_pilot_model(base, cfg.model, len(cfg.tasks), 0, seed=cfg.run.seed, device=torch.device("cpu"),
                               pilot=cfg.pilot)
        strategy = get_strategy("pilot", cfg)
        strategy.policy.prepare_model(pm)
        sent = count(strategy.policy.shared_params(pm)) + count(strategy.policy.personal_params(pm))
        conn, tasks = pm.connector, len(cfg.tasks)
        activated = (count(p for _, p in pm.lora_named_parameters())
                     + (2 * tasks - 1) * count(conn.task_adapter.parameters()) + conn.router.weight.numel())
        if ct:
            activated += ct_clip_counts(pm.model.base_model.model.model.vision_tower, tasks)["activated"]
        print(f"| {'Pilot + CT-CLIP' if ct else 'Pilot'} | {activated:,} | {sent:,} | {count(pm.model.parameters()):,} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "configs/synthetic_fedmit.yaml")
