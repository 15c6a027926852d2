"""Export one client's personalised model from a run's checkpoint:
`python -m pilot_hpc.export --run RUN_DIR [--round R] --client K --out DIR`.

DIR then holds
  adapter_config.json, adapter_model.safetensors   the client's LoRA as a peft adapter:
                        PeftModel.from_pretrained(base_llava, DIR) loads it (FedDPA: the
                        global adapter here, its local one in DIR/local/, their fixed mix
                        folded into each adapter's lora_alpha)
  connector.safetensors, connector.json   the whole Pilot connector (task, client,
                        foreign and cross-task adapters, router) and what rebuilds it
                        (tasks, own task, stage, switches, base model, generation settings)
  ct_clip.safetensors   (pilot.ct_clip runs) every CLIP MLP's connector, "<layer>.<name>"
  tokenizer and image processor files (the base model's)
  stack_base.safetensors (fl.lora_rank_rule=stack) the base weights of the LoRA target
                        modules with every round's stacked product merged in (the adapter
                        applies on top of them; load_client puts them in first)
  merged/               (when the evaluated connector is a plain LLaVA projector: FedAvg,
                        FedProx, FedAdam, Shepherd, local, centralized, FedDPA, and any
                        round-0 model) a stock Hugging Face LLaVA folder, LoRA merged, that
                        LlavaForConditionalGeneration.from_pretrained loads without pilot_hpc

pilot_hpc.load_client(DIR) rebuilds the model as the run evaluated it. Exit codes: 0,
2 bad input (no checkpoints, no such round or client, an unreadable checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pilot_hpc import jsonout
from pilot_hpc.errors import BadInput, ExportError

EXIT_BAD_INPUT = 2
CONNECTOR_FILE = "connector.safetensors"
CONNECTOR_CONFIG = "connector.json"
CT_CLIP_FILE = "ct_clip.safetensors"  # pilot.ct_clip runs: the CLIP MLPs' connectors
MERGED = "merged"
STACK_BASE_FILE = "stack_base.safetensors"  # fl.lora_rank_rule=stack: the merged base weights


def find_checkpoint(run_dir: str, round_: int | None) -> str:
    """The complete checkpoint of round_ (default: the newest complete one) in run_dir."""
    from pilot_hpc.checkpoint import candidates, file_name

    folder = os.path.join(run_dir, "checkpoints")
    complete = [c for c in candidates(folder) if c[2]]
    if not complete:
        raise ExportError(f"{folder}: no complete checkpoint (round_NNN.h5); is {run_dir} a pilot_hpc run's "
                          "run.output_dir, and has it finished a round?")
    if round_ is None:
        return complete[0][0]
    path = os.path.join(folder, file_name(round_, True))
    if not os.path.isfile(path):
        raise ExportError(f"{run_dir}: no checkpoint of round {round_} ({path}); complete rounds: "
                          f"{sorted(c[1] for c in complete)}")
    return path


def run_config(attrs: dict, path: str):
    import yaml

    from pilot_hpc.config import ConfigError, config_from_dict

    try:
        return config_from_dict(yaml.safe_load(attrs["config"]), f"checkpoint {path}: config")
    except (ConfigError, yaml.YAMLError) as err:
        raise ExportError(f"checkpoint {path}: its stored config cannot be read: {err}") from None


def base_model_folder(cfg) -> str:
    """The run's base LLaVA folder: model.path, or the synthetic world's cached tiny base."""
    if cfg.model.path:
        folder = cfg.model.path
    else:
        from pilot_hpc.data import synthetic
        from pilot_hpc.train.warm_start import base_folder

        folder = base_folder(cfg, synthetic.spec_for(cfg).key())
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ExportError(f"the run's base model folder {folder} is missing (run.cache_dir {cfg.run.cache_dir}): "
                          "export where the run's cache is, or rerun to rebuild it")
    return folder


def _install_pending(policy, pm, client: int, task_id: int, record, installs: dict) -> None:
    """The broadcast rows newer than the client's installed round, as its next hosting
    in the run would install them."""
    from types import SimpleNamespace

    from pilot_hpc.fl.client import hosting
    from pilot_hpc.fl.installs import PendingRows, catch_up

    slot = SimpleNamespace(k=client, task_id=task_id, state=record.state, installs=None, release=lambda: None)
    with hosting(pm, slot):  # names the client (a zero_pad truncation needs it)
        catch_up(policy, pm, PendingRows.from_record(installs), record.installed)


def export_client(run_dir: str, client: int, out: str, round_: int | None = None, merged: bool = True) -> dict:
    """Writes DIR (see the module docstring); returns connector.json's content."""
    import torch
    from safetensors.torch import save_file

    from pilot_hpc.checkpoint import CheckpointError, read
    from pilot_hpc.fl.strategies import get_strategy
    from pilot_hpc.model.connector import PLAIN
    from pilot_hpc.model.build import build_pilot_model

    path = find_checkpoint(run_dir, round_)
    try:
        head = read(path, clients=[])
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    cfg = run_config(head.attrs, path)
    if not 0 <= client < cfg.fl.num_clients:
        raise ExportError(f"checkpoint {path}: no client {client}; the run has clients 0..{cfg.fl.num_clients - 1}")
    try:
        ck = read(path, clients=[client])
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    record = ck.clients[client]
    task = cfg.fl.client_tasks[client]
    strategy = get_strategy(cfg.fl.strategy, cfg)
    stage = 0 if ck.round == 0 else strategy.policy.stage(ck.round)
    base = base_model_folder(cfg)
    pm = build_pilot_model(base, cfg.model, len(cfg.tasks), cfg.tasks.index(task), seed=cfg.run.seed,
                           device=torch.device("cpu"), pilot=cfg.pilot)
    strategy.policy.prepare_model(pm)
    expected = pm.get_state()
    missing = sorted(set(expected) - set(record.state))
    if missing:
        raise ExportError(f"checkpoint {path}: /clients/client_{client:02d}/state lacks {missing[:5]}")
    pm.set_state(record.state)
    if ck.installs is not None and record.installed is not None:  # rows it sat out for (fl/installs.py)
        # Row t is task t in the run's task order, which /installs keeps (checkpoints
        # written before the config kept its key order reload task_metrics sorted).
        tasks = ck.installs.get("tasks") or cfg.tasks
        _install_pending(strategy.policy, pm, client, tasks.index(task), record, ck.installs)
    pm.set_stage(stage)
    os.makedirs(out, exist_ok=True)
    if cfg.fl.lora_rank_rule == "stack":  # the merged base weights, into the model and beside the adapter
        write_stack_base(strategy, pm, ck.server, out)
    adapters = list(pm.model.peft_config)
    pm.model.save_pretrained(out, selected_adapters=adapters)
    mix = lora_mix(pm.model)
    for name in adapters:  # FedDPA's fixed mix into lora_alpha (peft: scaling = alpha / r)
        cfg_path = os.path.join(out, "" if name == "default" else name, "adapter_config.json")
        with open(cfg_path) as fh:
            adapter = json.load(fh)
        adapter["base_model_name_or_path"] = os.path.abspath(base)
        if mix.get(name, 1.0) != 1.0:
            adapter["lora_alpha"] = mix[name] * adapter["lora_alpha"]
        with open(cfg_path, "w") as fh:
            jsonout.dump(adapter, fh, indent=2, sort_keys=True)
    own_rank_adapter(cfg, client, out)
    connector = {k: v.detach().cpu().contiguous() for k, v in pm.connector.state_dict().items()}
    save_file(connector, os.path.join(out, CONNECTOR_FILE))
    if pm.clip_mlps:  # CT-CLIP: every CLIP MLP's connector, keyed "<layer>.<name>"
        clip = {f"{i}.{k}": v.detach().cpu().contiguous() for i, m in enumerate(pm.clip_mlps)
                for k, v in m.state_dict().items()}
        save_file(clip, os.path.join(out, CT_CLIP_FILE))
    pm.tokenizer.save_pretrained(out)
    pm.image_processor.save_pretrained(out)
    import dataclasses

    info = {
        "format": "pilot_hpc-client-export-1", "run": os.path.abspath(run_dir), "checkpoint": os.path.abspath(path),
        "round": ck.round, "client": client, "task": task, "metric": cfg.metric(task), "strategy": cfg.fl.strategy,
        "base_model": os.path.abspath(base), "dtype": cfg.model.dtype, "num_tasks": len(cfg.tasks),
        "own_task": cfg.tasks.index(task), "stage": stage, "seed": cfg.run.seed, "ctmoa_impl": cfg.model.ctmoa_impl,
        "pilot": dataclasses.asdict(cfg.pilot), "adapters": adapters, "family": pm.family.name,
        "plain_projector": stage in (0, PLAIN),
        # What evaluation used: batch mode of pilot_hpc.generate repeats it for equal answers.
        "generation": {"max_new_tokens": cfg.train.max_new_tokens, "batch_size": cfg.train.eval_batch_size,
                       "max_length": cfg.data.max_length, "num_image_tokens": pm.num_image_tokens,
                       "image_aspect_ratio": cfg.data.image_aspect_ratio},
    }
    if merged and info["plain_projector"]:
        write_merged(pm, os.path.join(out, MERGED))
        info["merged"] = MERGED
    with open(os.path.join(out, CONNECTOR_CONFIG), "w") as fh:
        jsonout.dump(info, fh, indent=2, sort_keys=True)
    return info


def own_rank_adapter(cfg, client: int, out: str) -> None:
    """Heterogeneous ranks (zero_pad): the exported adapter at the client's own rank r_k,
    not the model's padded R (the components beyond r_k are zero). The run applied the
    model's scaling alpha / R to every client, so the adapter gets lora_alpha = alpha r_k / R,
    which keeps alpha' / r_k = alpha / R: the same layer change."""
    from safetensors.torch import load_file, save_file

    from pilot_hpc.config import client_lora_ranks
    from pilot_hpc.fl.lora_distance import own_rank

    rank, full = client_lora_ranks(cfg)[client], cfg.model.lora_r
    if rank == full:
        return
    weights = os.path.join(out, "adapter_model.safetensors")
    save_file(own_rank(load_file(weights), rank), weights)
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as fh:
        adapter = json.load(fh)
    adapter["r"], adapter["lora_alpha"] = rank, adapter["lora_alpha"] * rank / full
    with open(cfg_path, "w") as fh:
        jsonout.dump(adapter, fh, indent=2, sort_keys=True)


def write_stack_base(strategy, pm, server: dict, out: str) -> None:
    """fl.lora_rank_rule=stack: every round's stacked LoRA product is merged into the base
    weights of the LoRA target modules (fl/stack.py), the checkpoint's server state. They go
    into `pm` (so merged/ holds them) and into DIR/stack_base.safetensors under the base
    model's own names, which load_client puts into the base before the adapter."""
    from safetensors.torch import save_file

    agg = strategy.aggregator
    agg.attach(pm)
    try:
        agg.load_server_state(server)
    except BadInput as err:
        raise ExportError(str(err)) from None
    prefix = "base_model.model."
    save_file({f"{path.removeprefix(prefix)}.weight": w.detach().cpu().contiguous()
               for path, w in agg.bases.items()}, os.path.join(out, STACK_BASE_FILE))


def lora_mix(peft_model) -> dict[str, float]:
    """Each adapter's scaling relative to alpha / r (FedDPA's mix; 1.0 elsewhere)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            return {name: module.scaling[name] / (module.lora_alpha[name] / module.r[name]) for name in module.scaling}
    return {}


def write_merged(pm, folder: str) -> None:
    """A stock model of the family: psi_t as its connector, every active LoRA merged
    into the weights."""
    import copy

    import torch

    model = copy.deepcopy(pm.model)
    pm.family.set_connector(model, pm.family.stock_connector(copy.deepcopy(pm.connector.task_adapter)))
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        merged.save_pretrained(folder, safe_serialization=True)
    pm.tokenizer.save_pretrained(folder)
    pm.image_processor.save_pretrained(folder)


def load_client(folder: str, device: str = "cpu"):
    """The client's model (its family's transformers class) from an export folder, as the run
    evaluated it: the Pilot connector in place of the projector (in its stage), the LoRA
    merged (FedDPA: both adapters with their mix). `.tokenizer` and `.image_processor`
    are attached to the returned model; `.pilot_export` holds connector.json."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer

    from pilot_hpc.config import PilotConfig
    from pilot_hpc.model.connector import PilotConnector
    from pilot_hpc.model.ct_clip import attach_ct_clip
    from pilot_hpc.model.build import configure_generation, load_base

    info_path = os.path.join(folder, CONNECTOR_CONFIG)
    if not os.path.isfile(info_path):
        raise ExportError(f"{folder}: no {CONNECTOR_CONFIG}; not a folder `python -m pilot_hpc.export` wrote")
    with open(info_path) as fh:
        info = json.load(fh)
    # Exports written before model.family existed are LLaVA-1.5's ("llava").
    model, _, _, spec = load_base(info["base_model"], info["dtype"], family=info.get("family", "llava"))
    connector = PilotConnector(spec.connector_mlp(spec.get_connector(model)), info["num_tasks"], info["own_task"],
                               pilot=PilotConfig(**info["pilot"]), ctmoa_impl=info["ctmoa_impl"], seed=info["seed"])
    connector.load_state_dict(load_file(os.path.join(folder, CONNECTOR_FILE)))
    # As the run held them (model/build.py attach_pilot): float32 adapters in a model of
    # any dtype, the connector casting at its boundary.
    connector.to(torch.float32)
    connector.set_stage(info["stage"])
    spec.set_connector(model, connector)
    switches = PilotConfig(**info["pilot"])
    if switches.ct_clip:
        clip = load_file(os.path.join(folder, CT_CLIP_FILE))
        mlps = attach_ct_clip(spec.vision_tower(model), info["num_tasks"], info["own_task"], pilot=switches,
                              ctmoa_impl=info["ctmoa_impl"], seed=info["seed"])
        for i, m in enumerate(mlps):
            m.load_state_dict({k[len(f"{i}."):]: v for k, v in clip.items() if k.startswith(f"{i}.")})
            m.to(torch.float32)
            m.set_stage(info["stage"])
    stack_base = os.path.join(folder, STACK_BASE_FILE)
    if os.path.isfile(stack_base):  # fl.lora_rank_rule=stack: the rounds' merged products, in the base
        with torch.no_grad():
            for name, t in load_file(stack_base).items():
                model.get_parameter(name).copy_(t)
    peft_model = PeftModel.from_pretrained(model, folder)
    for name in info["adapters"]:
        if name != "default":
            peft_model.load_adapter(os.path.join(folder, name), adapter_name=name)
    peft_model.base_model.set_adapter(info["adapters"])
    model = peft_model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    configure_generation(model, tokenizer)
    model.tokenizer = tokenizer
    model.image_processor = AutoImageProcessor.from_pretrained(folder)
    model.pilot_export = info
    # The family's prompt (its chat template's user turn), for pilot_hpc.generate.
    model.pilot_family = spec
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(torch.device(device)).eval()


def quiet() -> None:
    """No weight-loading bars or peft deprecation notices on a command line tool's output."""
    import transformers

    from pilot_hpc.model.build import quiet_checkpointing_deprecation

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_checkpointing_deprecation()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the run's run.output_dir (holds checkpoints/)")
    ap.add_argument("--round", type=int, default=None, help="round to export (default: the newest complete one)")
    ap.add_argument("--client", type=int, required=True, help="client id K")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--no-merged", action="store_true", help="skip the merged stock LLaVA folder")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    quiet()
    try:
        info = export_client(args.run, args.client, args.out, args.round, merged=not args.no_merged)
    except BadInput as err:  # ExportError, or the base model folder's ConfigError (model/build.py:load_base)
        print(f"pilot_hpc.export: error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    kind = "pilot connector" if not info["plain_projector"] else "plain projector (+ merged/)"
    print(f"exported client {info['client']} ({info['task']}, {info['strategy']}, round {info['round']}, {kind}) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
