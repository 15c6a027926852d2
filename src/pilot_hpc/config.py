"""Run configuration: dataclass schema <- YAML overlay <- `section.key=value` overrides.

Every rank parses and validates the same config before anything trains, so a bad
value fails identically everywhere with one message and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from pilot_hpc.errors import ConfigError
from pilot_hpc.sections import (  # noqa: F401 - re-exported: the config's public names
    SYNTHETIC_TASKS, DEFAULT_TASK_METRICS, Metric, RunConfig, ModelConfig, PretrainConfig, DataConfig,
    FLConfig, PilotConfig, FedProxConfig, FedAdamConfig, FedDPAConfig, TrainConfig, PrivacyConfig,
    SECURE_SUM_REFUSED, SECURE_SUM_STRATEGIES)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    fedadam: FedAdamConfig = field(default_factory=FedAdamConfig)
    feddpa: FedDPAConfig = field(default_factory=FedDPAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self):
        check_bounds(self)
        fl = self.fl
        if len(fl.client_tasks) != fl.num_clients:
            raise ConfigError(
                f"fl.client_tasks has {len(fl.client_tasks)} entries but fl.num_clients is {fl.num_clients}"
            )
        unknown = sorted(set(fl.client_tasks) - set(fl.task_metrics))
        if unknown:
            raise ConfigError(f"fl.client_tasks: unknown task(s) {unknown}; tasks in fl.task_metrics: "
                              f"{list(fl.task_metrics)}")
        idle = [t for t in fl.task_metrics if t not in fl.client_tasks]
        if idle:
            raise ConfigError(f"task(s) {idle} in fl.task_metrics have no client in fl.client_tasks: "
                              "assign them clients or remove them from fl.task_metrics")
        if self.data.unseen_combos and len(self.tasks) != 3:
            raise ConfigError(f"data.unseen_combos={self.data.unseen_combos} spreads the combinations over exactly 3 "
                              f"tasks; fl.task_metrics has {len(self.tasks)}")
        if self.data.kind == "synthetic" and not set(fl.client_tasks) <= set(SYNTHETIC_TASKS):
            raise ConfigError(f"data.kind=synthetic draws only the tasks {list(SYNTHETIC_TASKS)}; "
                              f"fl.client_tasks has {sorted(set(fl.client_tasks) - set(SYNTHETIC_TASKS))}")
        stray = sorted(set(self.data.unseen_cells) - set(fl.client_tasks))
        if stray:
            raise ConfigError(f"data.unseen_cells names task(s) {stray} that no client has; tasks: "
                              f"{sorted(set(fl.client_tasks))}")
        if self.pilot.top_m >= fl.num_clients or self.pilot.top_m < 1:
            raise ConfigError(
                f"pilot.top_m (M = {self.pilot.top_m}) must satisfy 1 <= M < K = fl.num_clients ({fl.num_clients}): "
                "ATA mixes each client's LoRA with its M nearest other clients"
            )
        cpr = fl.clients_per_round
        if cpr >= 1 and (cpr != int(cpr) or cpr > fl.num_clients):
            raise ConfigError(f"fl.clients_per_round={cpr!r}: a value >= 1 is a count of clients, so it must be a "
                              f"whole number at most fl.num_clients ({fl.num_clients}); for a share of the clients "
                              "give a fraction in (0, 1), for every client 0")
        if cpr and fl.strategy == "centralized":
            raise ConfigError("fl.clients_per_round: fl.strategy=centralized trains one model on every client's data "
                              "in every round, so it samples no clients; leave fl.clients_per_round at 0")
        if self.train.max_local_seconds and self.train.engine != "torch":
            raise ConfigError("train.max_local_seconds cuts a client's round short, which only train.engine=torch "
                              "does (a DeepSpeed group's members would have to agree on the step); set "
                              "train.engine=torch or train.max_local_seconds=0")
        if (fl.eval_clients == "sample") != (fl.eval_sample > 0) or fl.eval_sample > fl.num_clients:
            raise ConfigError(f"fl.eval_sample={fl.eval_sample} with fl.eval_clients={fl.eval_clients}: a sample of "
                              f"1 to fl.num_clients ({fl.num_clients}) clients goes with fl.eval_clients=sample, and "
                              "only with it (leave fl.eval_sample at 0 otherwise)")
        if fl.client_state == "disk" and self.run.ranks_per_client > 1:
            raise ConfigError(f"fl.client_state=disk keeps one rank's clients in its files, but with "
                              f"run.ranks_per_client={self.run.ranks_per_client} a client group shares its states "
                              "in memory; use fl.client_state=memory or run.ranks_per_client=1")
        if fl.on_client_error == "exclude" and self.run.ranks_per_client > 1:
            raise ConfigError("fl.on_client_error=exclude drops a client whose round raises on its rank, but with "
                              f"run.ranks_per_client={self.run.ranks_per_client} the client's other ranks would wait "
                              "in its collectives; use fl.on_client_error=abort or run.ranks_per_client=1")
        if self.pilot.ct_clip and fl.strategy != "pilot":
            raise ConfigError(f"pilot.ct_clip gives CLIP's MLPs Pilot's stages, so it needs fl.strategy=pilot "
                              f"(got {fl.strategy})")
        if self.privacy.secure_aggregation and fl.strategy in SECURE_SUM_REFUSED:
            raise ConfigError(f"privacy.secure_aggregation=true cannot go with fl.strategy={fl.strategy}: "
                              f"{SECURE_SUM_REFUSED[fl.strategy]}; use one of {', '.join(SECURE_SUM_STRATEGIES)}, "
                              "or set privacy.secure_aggregation=false")
        check_privacy(self)
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                              f"train.grad_accum_steps ({self.train.grad_accum_steps}): batch_size is the effective "
                              "batch, split into grad_accum_steps equal micro-batches")
        if self.run.ranks_per_client > 1 and self.train.engine != "deepspeed":
            raise ConfigError(f"run.ranks_per_client={self.run.ranks_per_client} trains each client data-parallel "
                              "through DeepSpeed: set train.engine=deepspeed (or run.ranks_per_client=1)")
        if self.data.kind == "llava_json":
            if not self.model.path:
                raise ConfigError("data.kind=llava_json needs model.path (a local Hugging Face LLaVA folder)")
            for key in ("train_files", "eval_files"):
                got = len(getattr(self.data, key))
                if got != fl.num_clients:
                    raise ConfigError(f"data.{key} lists {got} files but fl.num_clients is {fl.num_clients}")

        check_lora_ranks(self)

    @property
    def tasks(self) -> list[str]:
        """The tasks present, in canonical order (their ids are indices in this list)."""
        return list(self.fl.task_metrics)

    def metric(self, task: str) -> str:
        return self.fl.task_metrics[task]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps(_hashed(self.to_dict()), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def result_hash(self) -> str:
        """Hash of the fields that change results (a resume with another one is refused)."""
        blob = json.dumps(result_fields(_hashed(self.to_dict())), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def client_lora_ranks(cfg: "Config") -> list[int]:
    """Every client's LoRA rank: model.lora_ranks, or by task model.lora_task_ranks, or model.lora_r."""
    m = cfg.model
    if m.lora_ranks:
        return list(m.lora_ranks)
    if m.lora_task_ranks:
        return [m.lora_task_ranks[t] for t in cfg.fl.client_tasks]
    return [m.lora_r] * cfg.fl.num_clients


def padded_client_ranks(cfg: "Config") -> list[int] | None:
    """Every client's rank when some client's is below model.lora_r (its LoRA is then stored
    padded and truncated to it); None when every client has the model's rank."""
    ranks = client_lora_ranks(cfg)
    return ranks if min(ranks) < cfg.model.lora_r else None


def check_lora_ranks(cfg: "Config") -> None:
    m, fl = cfg.model, cfg.fl
    if fl.lora_rank_rule == "stack":
        check_stack(cfg)
    if cfg.pilot.distance == "product" and fl.sends_changes():
        raise ConfigError(f"pilot.distance=product compares the clients' LoRA products B A, but with fl.codec / "
                          f"fl.codec_down = {fl.codecs()} the rows travel as changes over the round, whose factors "
                          "do not multiply to a change of the product: use pilot.distance=params with a lossy codec, or "
                          "fl.codec=float32")
    if not (m.lora_ranks or m.lora_task_ranks):
        return
    if m.lora_ranks and m.lora_task_ranks:
        raise ConfigError("model.lora_ranks and model.lora_task_ranks both set: give the clients' ranks one way")
    if m.lora_ranks and len(m.lora_ranks) != fl.num_clients:
        raise ConfigError(f"model.lora_ranks has {len(m.lora_ranks)} entries but fl.num_clients is {fl.num_clients}: "
                          "give one rank per client (or model.lora_task_ranks, one per task)")
    if m.lora_task_ranks and set(m.lora_task_ranks) != set(cfg.tasks):
        raise ConfigError(f"model.lora_task_ranks names tasks {sorted(m.lora_task_ranks)}; give a rank for each task "
                          f"of fl.task_metrics, exactly: {cfg.tasks}")
    ranks = client_lora_ranks(cfg)
    if min(ranks) < 1:
        raise ConfigError(f"model.lora_ranks / model.lora_task_ranks: every rank must be >= 1, got {ranks}")
    if max(ranks) != m.lora_r:
        raise ConfigError(f"model.lora_r ({m.lora_r}) must be the largest client rank ({max(ranks)}): the shared "
                          f"model holds every client's LoRA padded to it (fl.lora_rank_rule=zero_pad); set "
                          f"model.lora_r={max(ranks)}")
    if fl.strategy != "pilot" and len(set(ranks)) > 1 and fl.lora_rank_rule != "stack":
        raise ConfigError(f"model.lora_ranks: clients of different ranks are wired for fl.strategy=pilot (its "
                          f"per-client LoRA rows, fl.lora_rank_rule=zero_pad) and for fl.strategy=fedavg / fedprox "
                          f"with fl.lora_rank_rule=stack, got fl.strategy={fl.strategy}")


# The strategies whose LoRA is one global model: FLoRA's stacked product, merged into the
# base weights that every client of a rank shares, is then every client's exact answer.
STACK_STRATEGIES = ("fedavg", "fedprox")


def check_stack(cfg: "Config") -> None:
    """fl.lora_rank_rule=stack (fl/stack.py) where it composes, with the reason and fix named."""
    fl = cfg.fl
    if fl.strategy not in STACK_STRATEGIES:
        raise ConfigError(f"fl.lora_rank_rule=stack merges the stacked LoRA product into the base weights, which "
                          f"all clients of a rank share, so it needs one global LoRA (fl.strategy fedavg or fedprox); "
                          f"fl.strategy={fl.strategy} gives clients their own LoRA, and each would need its own dense "
                          "residual the size of the full weights: use fl.lora_rank_rule=zero_pad")
    if fl.codecs() != ("float32", "float32"):
        raise ConfigError(f"fl.lora_rank_rule=stack sends the clients' LoRA factors, whose exact product is merged; "
                          f"with fl.codec / fl.codec_down / fl.wire_dtype = {fl.codecs()} they would travel rounded "
                          "(or as changes, whose factors do not multiply to a change of the product): set "
                          "fl.codec=float32, fl.codec_down unset and fl.wire_dtype=float32, or fl.lora_rank_rule=zero_pad")
    if cfg.privacy.secure_aggregation:
        raise ConfigError("fl.lora_rank_rule=stack needs every participant's LoRA factors on the server (the "
                          "product of a sum is not the sum of the products), which secure aggregation hides: set "
                          "privacy.secure_aggregation=false or fl.lora_rank_rule=zero_pad")
    if cfg.privacy.where != "none":
        raise ConfigError(f"fl.lora_rank_rule=stack with privacy.where={cfg.privacy.where}: clipping and noise act on "
                          "the update's parameters, not on the merged product, so the privacy guarantee would not "
                          "cover what is merged; set privacy.where=none or fl.lora_rank_rule=zero_pad")
    if cfg.run.ranks_per_client > 1:
        raise ConfigError(f"fl.lora_rank_rule=stack with run.ranks_per_client={cfg.run.ranks_per_client}: the members "
                          "of a client group take their leader's client states, not its merged base weights; set "
                          "run.ranks_per_client=1")
    if cfg.model.dtype != "float32":
        raise ConfigError(f"fl.lora_rank_rule=stack with model.dtype={cfg.model.dtype}: each round's product is added "
                          "to the base weights, and in a 16-bit base most of it rounds away (a change below half an "
                          "ulp of the weight is lost); set model.dtype=float32 or fl.lora_rank_rule=zero_pad")


# Keys whose listed default does what a config without the key does: left out of both
# hashes while at that default, so a run recorded without the key keeps its config_hash
# (launch's finished and reused runs, tools/study) and its checkpoints their result_hash.
# Set to anything else, the key is hashed like any other.
UNHASHED_AT_DEFAULT = {"fedadam.weighting": "samples", "run.restart": False, "fl.transforms": [],
                       "train.lr_baseline": 0.0, "data.unseen_combos": "", "data.eval_subsets": [],
                       "data.eval_interim_samples": 0, "model.family": "",
                       "fl.clients_per_round": 0.0, "fl.sampling": "uniform", "fl.on_client_error": "abort",
                       "fl.eval_every": 1, "fl.eval_clients": "all", "fl.eval_sample": 0,
                       "fl.eval_reuse": True, "fl.client_state": "memory",
                       "train.max_local_seconds": 0.0,
                       "privacy.where": "none", "privacy.clip_norm": 1.0, "privacy.noise_multiplier": 0.0,
                       "privacy.target_epsilon": 0.0, "privacy.delta": 1e-5, "privacy.accountant": "rdp",
                       "privacy.epsilon_budget": 0.0, "privacy.secure_aggregation": False,
                       "privacy.adaptive_clip": False, "privacy.clip_quantile": 0.5, "privacy.clip_lr": 0.2,
                       "privacy.clip_count_stddev": 0.0,
                       "fl.codec": "float32", "fl.codec_down": "", "pilot.distance": "params",
                       "model.lora_ranks": [], "model.lora_task_ranks": {}, "fl.lora_rank_rule": "zero_pad"}


def _hashed(config: dict[str, Any]) -> dict[str, Any]:
    out = {section: dict(values) for section, values in config.items()}
    for key, default in UNHASHED_AT_DEFAULT.items():
        section, name = key.split(".")
        if name in out.get(section, {}) and out[section][name] == default:
            del out[section][name]
            if not out[section]:  # a whole new section at its defaults: as if it did not exist
                del out[section]
    return out


# Numeric ranges, checked in one place (check_bounds) with the key named; a value out of
# range would otherwise fail later, after the models load, with a traceback per rank.
BOUNDS = {
    "run.threads_per_rank": ">= 1", "run.log_every": ">= 1", "run.ranks_per_client": ">= 1", "run.seed": ">= 0",
    "model.image_size": ">= 1", "model.patch_size": ">= 1", "model.vision_hidden": ">= 1",
    "model.vision_layers": ">= 1", "model.vision_heads": ">= 1", "model.text_hidden": ">= 1",
    "model.text_layers": ">= 1", "model.text_heads": ">= 1", "model.text_intermediate": ">= 1",
    "model.lora_r": ">= 1", "model.lora_alpha": "> 0", "model.lora_dropout": "[0, 1)",
    "pretrain.steps": ">= 1", "pretrain.batch_size": ">= 1", "pretrain.lr": "> 0", "pretrain.samples": ">= 1",
    "data.train_min": ">= 1", "data.eval_interim_samples": ">= 0", "data.eval_samples": ">= 1", "data.max_length": ">= 1",
    "data.dominant_prob": "[0, 1]", "data.skew_alpha": ">= 0",
    "fl.num_clients": ">= 2", "fl.rounds": ">= 1", "fl.chunk_mb": ">= 0", "fl.clients_per_round": ">= 0",
    "fl.eval_every": ">= 1", "fl.eval_sample": ">= 0",
    "pilot.ata_eps": ">= 0",
    "fedprox.mu": ">= 0",
    "fedadam.server_lr": "> 0", "fedadam.beta1": "[0, 1)", "fedadam.beta2": "[0, 1)", "fedadam.tau": "> 0",
    "feddpa.local_weight": "[0, 1]",
    "train.local_epochs": ">= 1", "train.max_steps": ">= 0", "train.batch_size": ">= 1",
    "train.eval_batch_size": ">= 1", "train.lr_stage1": "> 0", "train.lr_stage2": "> 0",
    "train.lr_baseline": ">= 0", "train.weight_decay": ">= 0", "train.lambda_diff": ">= 0",
    "train.lambda_balance": ">= 0", "train.lambda_z": ">= 0", "train.grad_clip": ">= 0",
    "train.max_new_tokens": ">= 1", "train.max_local_seconds": ">= 0",
    "train.grad_accum_steps": ">= 1", "train.warmup_ratio": "[0, 1)", "data.num_workers": ">= 0",
    "privacy.clip_norm": "> 0", "privacy.noise_multiplier": ">= 0", "privacy.target_epsilon": ">= 0",
    "privacy.epsilon_budget": ">= 0", "privacy.clip_quantile": "[0, 1]", "privacy.clip_lr": ">= 0",
    "privacy.clip_count_stddev": ">= 0",
}


# Strategies whose server step is a sum of the updates with public weights: server-side
# noise on that sum (privacy.where=server) needs one. The others compare or keep
# individual updates (Pilot's ATA, FedDPA's and Shepherd's per-client parts) or send none.
SERVER_DP_STRATEGIES = ("fedavg", "fedprox", "fedadam")
NO_EXCHANGE_STRATEGIES = ("local", "centralized")


def check_privacy(cfg: "Config") -> None:
    p, strategy = cfg.privacy, cfg.fl.strategy
    if p.where == "server" and strategy not in SERVER_DP_STRATEGIES:
        raise ConfigError(f"privacy.where=server adds noise to the sum of the clipped updates, which needs a server "
                          f"step that is a sum with public weights ({', '.join(SERVER_DP_STRATEGIES)}); "
                          f"fl.strategy={strategy} uses individual updates (or sends none): use privacy.where=client "
                          "(each client noises its own update, local DP) or one of those strategies")
    if p.where == "client" and strategy in NO_EXCHANGE_STRATEGIES:
        raise ConfigError(f"privacy.where=client noises the updates that leave the clients, but fl.strategy={strategy} "
                          "sends none: set privacy.where=none")
    if p.adaptive_clip and p.secure_aggregation:
        raise ConfigError("privacy.adaptive_clip=true needs each participant's clip bit (its change within C or "
                          "not) in the server's clear view, which privacy.secure_aggregation=true hides by design: "
                          "set privacy.adaptive_clip=false (a fixed privacy.clip_norm) or drop the secure aggregation")
    if p.adaptive_clip and p.where != "server":
        raise ConfigError(f"privacy.adaptive_clip=true adapts C on a trusted server from a noisy count of the "
                          f"participants within it, but privacy.where={p.where}: set privacy.where=server (fedavg, "
                          "fedprox, fedadam) or privacy.adaptive_clip=false")
    if p.secure_aggregation and p.where == "server":
        raise ConfigError("privacy.secure_aggregation=true with privacy.where=server is not supported (untested "
                          "together: the server's noise needs equal public weights of the masked rows); use "
                          "privacy.where=client with secure aggregation, or one of the two alone")
    if p.secure_aggregation and cfg.fl.codecs() != ("float32", "float32"):
        raise ConfigError(f"privacy.secure_aggregation=true sends fixed-point ring words, so fl.codec / fl.codec_down / "
                          f"fl.wire_dtype must stay float32 (got up, down = {cfg.fl.codecs()}): the server cannot "
                          "decode a masked row; drop the codec or the secure aggregation")
    if p.epsilon_budget > 0 and p.where == "none":
        raise ConfigError("privacy.epsilon_budget stops a run whose epsilon would exceed it, but privacy.where=none "
                          "accounts nothing: set privacy.where=server or client, or privacy.epsilon_budget=0")


def _within(value: float, bound: str) -> bool:
    if bound.startswith("["):  # "[lo, hi]" or "[lo, hi)"
        lo, hi = (float(v) for v in bound[1:-1].split(","))
        return lo <= value and (value <= hi if bound.endswith("]") else value < hi)
    op, limit = bound.split()
    return value > float(limit) if op == ">" else value >= float(limit)


def check_bounds(cfg: "Config") -> None:
    for key, bound in BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not _within(value, bound):
            what = f"lie in {bound}" if bound.startswith("[") else f"be {bound}"
            raise ConfigError(f"{key} must {what}, got {value}")


# Fields that never change what a run computes: where it writes, how it logs, whether
# it resumes, and how many rounds it runs (a resumed run may go on for more rounds).
# The chunk size only changes how bytes travel (the mixes agree to float rounding); the
# DataLoader's workers load the same batches as the training thread (bitwise, tested).
# on_bad_sample only acts on unreadable samples: a run stopped by `fail` may resume as `skip`;
# on_client_error likewise only acts on a failing client (a run aborted by one may resume
# with exclude). The eval_* keys choose which clients are evaluated when (eval_reuse: whether
# two with the same model and items both generate), never what trains;
# client_state only where the states wait (read back bitwise). privacy.epsilon_budget only
# decides before which round a run stops, as fl.rounds does.
NON_RESULT_FIELDS = {"run.output_dir", "run.cache_dir", "run.log_every", "run.resume", "run.restart",
                     "fl.rounds", "fl.chunk_mb",
                     "data.num_workers", "data.on_bad_sample", "fl.on_client_error",
                     "fl.eval_every", "fl.eval_clients", "fl.eval_sample", "fl.eval_reuse", "fl.client_state", "run.tensorboard", "run.wandb_project",
                     "privacy.epsilon_budget"}


def result_fields(config: dict[str, Any]) -> dict[str, Any]:
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    return {k: v for k, v in flat.items() if k not in NON_RESULT_FIELDS}


def result_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every result-changing field that differs.

    A key missing on one side counts as its default: a checkpoint written before the key
    existed ran with what the default does now (a new key's default keeps the old
    behaviour), so it resumes unless the new config sets the key to something else."""
    defaults = result_fields(Config().to_dict())
    a, b = result_fields(old), result_fields(new)
    keys = sorted(set(a) | set(b))
    a = {k: a.get(k, defaults.get(k)) for k in keys}
    b = {k: b.get(k, defaults.get(k)) for k in keys}
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the MPI world, run on every rank before training."""
    per = cfg.run.ranks_per_client
    if world_size % per:
        raise ConfigError(f"{world_size} MPI ranks do not split into client groups of run.ranks_per_client={per}: "
                          f"start a multiple of {per} ranks")
    hosts = world_size // per
    if hosts > cfg.fl.num_clients:
        raise ConfigError(
            f"{world_size} MPI ranks make {hosts} client hosts but there are only {cfg.fl.num_clients} clients: "
            f"every host must have a client; start at most {cfg.fl.num_clients * per} ranks"
        )
    if cfg.fl.require_even_ranks and cfg.fl.num_clients % hosts:
        raise ConfigError(
            f"fl.require_even_ranks: {cfg.fl.num_clients} clients do not divide over {hosts} client hosts"
        )


# ---------------------------------------------------------------------------- loading


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks a YAML/CLI value against the dataclass field type (ints may be floats)."""
    origin = get_origin(typ)
    if origin is Literal:
        return _coerce_literal(value, get_args(typ), key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(typ)
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(typ)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _coerce_literal(value: Any, choices: tuple, key: str) -> Any:
    # YAML reads `0` as an int and `auto` as a string: compare as the choices' type.
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _section_fields(cls) -> dict[str, Any]:
    return get_type_hints(cls)


# Keys that moved, so that an older YAML file gets the new name instead of "unknown key".
MOVED = {"fl.top_m": "pilot.top_m", "fl.ata_eps": "pilot.ata_eps", "fl.prox_mu": "fedprox.mu",
         "fl.server_lr": "fedadam.server_lr", "fl.adam_beta1": "fedadam.beta1", "fl.adam_beta2": "fedadam.beta2",
         "fl.adam_tau": "fedadam.tau", "fl.dpa_local_weight": "feddpa.local_weight"}


def _merge(raw: dict[str, Any], origin: dict[str, str]) -> Config:
    """`origin` names where each `section.key` (and each section) came from: a YAML file,
    or the command-line override that set it, so an error blames the right one."""
    sections = _section_fields(Config)
    built = {}
    for name, value in raw.items():
        where = origin.get(name, "<defaults>")
        if name not in sections:
            raise ConfigError(f"{where}: unknown section {name!r}; valid sections: {sorted(sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(value).__name__}")
        fields = _section_fields(sections[name])
        for key in value:
            at = origin.get(f"{name}.{key}", where)
            if f"{name}.{key}" in MOVED:
                raise ConfigError(f"{at}: {name}.{key} is now {MOVED[f'{name}.{key}']} (each strategy's "
                                  "settings have a section of their own)")
            if key not in fields:
                raise ConfigError(f"{at}: unknown key {name}.{key}; valid keys of {name}: {sorted(fields)}")
        built[name] = sections[name](
            **{k: _coerce(v, fields[k], f"{origin.get(f'{name}.{k}', where)}: {name}.{k}") for k, v in value.items()}
        )
    return Config(**built)


def config_from_dict(raw: Any, source: str) -> Config:
    """A Config from a mapping of sections (e.g. one stored in a checkpoint), errors naming `source`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return _merge(raw, {name: source for name in raw})


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` with a YAML-parsed value (so 3 is an int, [a, b] a list)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. fl.rounds=2)")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    if parsed is None:
        parsed = ""
    return section, key, parsed


def _read_yaml(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: --config takes a YAML file (e.g. "
                          "configs/smoke_9client.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(paths: str | list[str] | tuple[str, ...] | None, overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in `paths`, in order (a later file's keys win, section by
    section) <- overrides; validated before returning."""
    if isinstance(paths, str):
        paths = [paths]
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in paths or ():
        for section, values in _read_yaml(path).items():
            origin.setdefault(section, path)
            if isinstance(values, dict) and isinstance(raw.get(section, {}), dict):
                raw.setdefault(section, {}).update(values)
                origin.update({f"{section}.{k}": path for k in values})
            else:
                raw[section] = values
                origin[section] = path
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        origin.setdefault(section, f"override {text!r}")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {text!r}: section {section!r} is not a mapping")
        raw[section][key] = value
        origin[f"{section}.{key}"] = f"override {text!r}"
    return _merge(raw, origin)
