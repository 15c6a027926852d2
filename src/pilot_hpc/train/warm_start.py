"""The built-in base model: a tiny LLaVA, warm-started once and cached as an HF folder.

It plays the part of the pretrained LLaVA-1.5 the paper starts from: the federation
only fine-tunes it. Measured here (docs/method.md, "The built-in base model"):
federating from random init with few local steps learns nothing in 3 rounds, while a
short central warm start on data disjoint from the clients' makes the federated rounds
visibly improve every client. The warm start is kept short on purpose so that the
clients still have much to gain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import torch

from pilot_hpc import cpumath
from pilot_hpc.config import Config
from pilot_hpc.data import synthetic
from pilot_hpc.data.records import InstructionDataset, load_records
from pilot_hpc.model import families
from pilot_hpc.model.build import configure_generation
from pilot_hpc.train.engines import train_steps
from pilot_hpc.train.spec import Hooks, TrainSpec

log = logging.getLogger("pilot_hpc.base")


def base_key(cfg: Config, data_key: str) -> str:
    # model.attn_implementation only applies when the clients load the base; the warm
    # start builds with the default (sdpa), so the cached base does not depend on it.
    # An empty model.family (the default family) is left out too. The clients' own LoRA ranks (model.lora_ranks,
    # lora_task_ranks) do not reach the warm start, which builds at model.lora_r.
    model = {k: v for k, v in cfg.to_dict()["model"].items()
             if k not in ("attn_implementation", "lora_ranks", "lora_task_ranks") and not (k == "family" and not v)}
    # The warm start is trained on this CPU: a base made with other math code paths
    # (cpumath.py) holds other numbers, so it is another cache entry.
    math = {key: os.environ.get(key, "") for key in (*cpumath.PINS, cpumath.SWITCH)}
    blob = json.dumps({"model": model, "pretrain": cfg.to_dict()["pretrain"],
                       "seed": cfg.run.seed, "data": data_key, "cpu_math": math}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_base(cfg: Config, data_folder: str, out_folder: str) -> None:
    """Builds the tiny model (the default family's), warm-starts it on the mixed-task
    pretrain split, saves it."""
    m = cfg.model
    spec = families.built_in(m.family)
    config, tokenizer, processor = spec.tiny(m, synthetic.vocabulary())
    torch.manual_seed(cfg.run.seed)
    model = spec.from_config(config)
    configure_generation(model, tokenizer)
    samples = load_records(os.path.join(data_folder, "pretrain.json"))
    n_image = spec.num_image_tokens(config)
    dataset = InstructionDataset(samples, tokenizer, processor, n_image, cfg.data.max_length,
                                 **spec.dataset_options(tokenizer, config))
    # The vision tower stays frozen and random (as CLIP stays frozen in LLaVA); the
    # projector and the whole LLM are trained, as in LLaVA-1.5's own instruction tuning.
    for p in spec.vision_tower(model).parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    p = cfg.pretrain

    def progress(step, terms):
        if step % max(cfg.run.log_every, 1) == 0 or step == p.steps:
            log.info("base warm start: step %d/%d  ce %.3f", step, p.steps, terms["ce"].item())

    spec = TrainSpec(lr=p.lr, batch_size=p.batch_size, epochs=10 ** 6, max_steps=p.steps, seed=cfg.run.seed + 12345)
    train_steps(model, dataset, params, spec, pad_id=tokenizer.pad_token_id, hooks=Hooks(progress=progress))
    parent = os.path.dirname(os.path.abspath(out_folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".base-", dir=parent)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if os.path.isdir(out_folder):
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_folder)


def base_folder(cfg: Config, data_key: str) -> str:
    return os.path.join(os.path.expanduser(cfg.run.cache_dir), f"base-{base_key(cfg, data_key)}")


def ensure_base(cfg: Config, data_folder: str, data_key: str) -> str:
    """The cached base model folder for this config, built on first use."""
    folder = base_folder(cfg, data_key)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        log.info("building the tiny base model (cached in %s)", folder)
        build_base(cfg, data_folder, folder)
    return folder
