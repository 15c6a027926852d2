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

# The synthetic world's task kinds and their metrics (the default of fl.task_metrics).
SYNTHETIC_TASKS = ("vqa", "caption", "grounding")
DEFAULT_TASK_METRICS = {"vqa": "vqa_accuracy", "caption": "cider", "grounding": "iou@0.5"}


# The metrics a task can be scored with (pilot_hpc.metrics.scores.METRICS has one
# function for each; a test keeps the two lists equal).
Metric = Literal["vqa_accuracy", "cider", "iou@0.5", "mc_accuracy", "mc_accuracy_lenient"]


@dataclass
class RunConfig:
    output_dir: str = "runs/smoke"
    seed: int = 0
    # CPU threads per rank. 1 keeps 9 ranks on 2 cores from oversubscribing, and makes
    # the float reductions (and so the results) identical for any world size.
    threads_per_rank: int = 1
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Where the built-in base model and the synthetic data are cached between runs.
    cache_dir: str = "~/.cache/pilot_hpc"
    log_every: int = 50
    # auto: continue from the newest valid checkpoint in output_dir/checkpoints (refused when
    # they come from another configuration); never: start over.
    resume: Literal["auto", "never"] = "auto"
    # true: start over in output_dir even though it holds another run. Whenever a run
    # starts over, the folder's earlier files are moved into output_dir/previous/<time>/
    # first, never overwritten. Meant for one command line, not a YAML file: a preempted
    # job requeued with it would start over again instead of resuming.
    restart: bool = False
    # MPI ranks per client (data-parallel inside a client through its DeepSpeed engine).
    # COMM_WORLD splits into groups of this many consecutive ranks; group leaders talk
    # to the server. 1: every rank is a client host (the default).
    ranks_per_client: int = 1
    # TensorBoard event files under <output_dir>/tensorboard/ (rank 0 writes them): per
    # client the step losses, lr and throughput; per round the metrics and the exchange.
    tensorboard: bool = True
    # Non-empty: also log to Weights & Biases under this project when `wandb` is installed
    # (WANDB_MODE=offline on clusters without internet; `wandb sync` later).
    wandb_project: str = ""



@dataclass
class ModelConfig:
    # Empty: build the tiny LLaVA below and pretrain it once (cached). Otherwise a local
    # Hugging Face folder of a supported family (e.g. llava-1.5-7b-hf) loaded with
    # from_pretrained.
    path: str = ""
    # The model family (pilot_hpc.model.families); empty: detected from model.path's
    # config.json (model_type). Set it to load a folder whose model_type is not listed.
    family: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    ctmoa_impl: Literal["auto", "triton", "reference"] = "auto"
    # Attention kernel of the LLM and the vision tower, passed to from_pretrained. sdpa is
    # what from_pretrained picks without the argument (checked for the tiny model), so the
    # default changes no result;
    # flash_attention_2 needs the flash-attn package (CUDA, bf16/fp16). Not part of the
    # cached base model's key: the warm start always builds with the default.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    def __post_init__(self):
        # patch_size < 1 is BOUNDS's to report (with its key), not a ZeroDivisionError here.
        if not self.path and self.patch_size >= 1 and self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size ({self.image_size}) must be a multiple of model.patch_size ({self.patch_size})"
            )


@dataclass
class PretrainConfig:
    """The built-in base model's warm start (the analogue of the pretrained LLaVA-1.5)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    samples: int = 3000  # mixed-task samples, drawn with a seed disjoint from the clients'


@dataclass
class DataConfig:
    kind: Literal["synthetic", "llava_json"] = "synthetic"
    # llava_json: one train and one eval JSON file per client (LLaVA conversation format)
    # and the folder their `image` paths are relative to.
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    image_root: str = ""
    # synthetic: samples per client are drawn between these bounds (so n_k differ).
    train_min: int = 1200
    train_max: int = 2000
    # synthetic: evaluation samples per client (eval_split=client) or per task (task).
    eval_samples: int = 60
    # synthetic scenario knobs (docs/results_synthetic_fedmit.md explains each one; the
    # defaults are the smoke world). eval_split: client = each client is scored on its own
    # draws (with its own colour preference); task = every client of a task on one shared
    # split drawn from the task's whole distribution, as in the paper.
    eval_split: Literal["client", "task"] = "client"
    # Probability that a client's sample takes its dominant colour (the smoke world's skew).
    dominant_prob: float = 0.5
    # > 0: each client draws colours and grid cells from its own Dirichlet(alpha) mix
    # (small alpha: few colours and cells per client) instead of dominant_prob.
    skew_alpha: float = 0.0
    # task -> grid cells (0..8, row-major) that no client of that task sees in training,
    # nor the base model's warm start for that task: only clients of other tasks do.
    unseen_cells: dict[str, list[int]] = field(default_factory=dict)
    # latin3 (three tasks): each (colour, cell) combination is left out of the training
    # data (and the warm start) of exactly one task: task t never sees colour c in cell j
    # when (c + j) % 3 == t (colours and tasks in their canonical order, cells row-major),
    # while the other two tasks do. Every colour, cell, word and box is still trained by
    # every task; only combinations transfer. Test items are tagged seen/unseen per task.
    unseen_combos: Literal["", "latin3"] = ""
    # Names of the evaluation subsets reported next to each client's metric
    # (metrics.json value_<name>, the predictions' "subset"): each evaluation record may
    # carry "subset": <name>; the metric of a subset is the mean of its items' scores.
    eval_subsets: list[str] = field(default_factory=list)
    # > 0: every round but the last scores only the first this many items of each
    # evaluation split (the last round scores all of them).
    eval_interim_samples: int = 0
    max_length: int = 64
    # Keep decoded images in memory (the tiny world: ~27 KB each). Off for real data:
    # LLaVA-1.5's 665k images at 336 px would need ~900 GB.
    cache_images: bool = True
    # Decode every image and tokenise every record before round 1, so a bad file stops
    # the job before anyone trains. Off for real data (it reads every image once).
    verify_images: bool = True
    # Worker processes of the training DataLoader (0: load on the training thread).
    num_workers: int = 0
    # pad: to a square in the processor's mean colour before resizing (LLaVA-1.5);
    # crop: the HF image processor's resize and centre crop.
    image_aspect_ratio: Literal["crop", "pad"] = "crop"
    # A training sample whose image cannot be decoded or whose text cannot be encoded, met
    # at run time (verify_images=false): skip leaves it out of its batch with a warning
    # naming the file and record, counted per client and round (metrics.json
    # "bad_samples"); fail checkpoints the round at that step, like a preemption, and
    # exits 2 naming the record, so the rerun after the fix resumes there.
    on_bad_sample: Literal["skip", "fail"] = "skip"

    def __post_init__(self):
        if self.train_max < self.train_min:
            raise ConfigError(f"data.train_min ({self.train_min}) must be <= data.train_max ({self.train_max})")
        if self.unseen_combos and sorted(self.eval_subsets) != ["seen", "unseen"]:
            raise ConfigError("data.unseen_combos tags the test items seen or unseen: set "
                              "data.eval_subsets=[seen, unseen] to report both")
        for task, cells in self.unseen_cells.items():
            if not set(cells) <= set(range(9)) or len(set(cells)) == 9:
                raise ConfigError(f"data.unseen_cells.{task}: cells must lie in 0..8 (row-major 3 x 3 grid) and "
                                  f"leave at least one seen, got {cells}")


@dataclass
class FLConfig:
    # The names pilot_hpc.fl.strategies registers (a unit test keeps the two equal): a typo
    # is then reported with the config, before torch and MPI load.
    strategy: Literal["pilot", "fedavg", "fedprox", "fedadam", "shepherd", "feddpa", "local", "centralized"] = "pilot"
    num_clients: int = 9
    # The task of each client; its length must equal num_clients.
    client_tasks: list[str] = field(
        default_factory=lambda: ["vqa"] * 3 + ["caption"] * 3 + ["grounding"] * 3
    )
    # Task name -> metric; the order of the keys is the task-id order (expert order in
    # CT-MoA). Real scenarios name datasets here (gqa: vqa_accuracy, coco: cider, ...).
    task_metrics: dict[str, Metric] = field(default_factory=lambda: dict(DEFAULT_TASK_METRICS))
    rounds: int = 3
    # true: every rank must host the same number of clients (K divisible by W).
    require_even_ranks: bool = False
    # Streamed exchange: MiB of one client's update per message chunk. The server holds
    # about (K + 2) chunks at a time beyond its own model. 0: one message per part.
    chunk_mb: float = 64.0
    # The dtype of the updates and mixes on the wire. The trainable parameters are
    # float32 master weights in a model of any dtype (model/build.py), so float32 sends
    # them as trained; bfloat16 halves the traffic of a bf16 run but rounds every
    # client's adapters to bf16 once per round (the server still mixes in float32).
    wire_dtype: Literal["float32", "bfloat16"] = "float32"
    # Registered transforms (pilot_hpc.fl.transforms) applied to every update in this
    # order, on the client before it leaves and in reverse on the server before mixing;
    # the wire dtype above always comes last.
    transforms: list[str] = field(default_factory=list)
    # Clients per round (pilot_hpc.fl.participation): 0 every client; a fraction in (0, 1)
    # of them, rounded up; or a count >= 1. Drawn from (run.seed, round) alone, so the same
    # on every rank, on resume and for any number of ranks.
    clients_per_round: float = 0.0
    # uniform: any `clients_per_round` clients; stratified: by task, every task seated
    # when the count allows (the count split in proportion to the tasks' sizes).
    sampling: Literal["uniform", "stratified"] = "uniform"
    # A client whose local round raises (RuntimeError, out-of-memory included; bad input
    # and stop requests never): abort ends the job naming rank and client; exclude drops
    # it from that round's aggregation, back to its round-start state, and goes on.
    on_client_error: Literal["abort", "exclude"] = "abort"
    # Evaluation of many clients (fl/participation.py:evaluated): every eval_every rounds
    # (round 0 and the last round always); eval_clients all, the round's participants (every
    # client in round 0 and the last round), or a fixed seeded sample of eval_sample clients
    # (stratified by task). Unevaluated clients' metrics rows hold null values.
    # Where the personal state of the clients a rank hosts lives between their turns:
    # memory, or disk (one safetensors file per client under run.output_dir/client_state/,
    # written atomically; fl/client_store.py), so a rank's memory does not grow with K.
    client_state: Literal["memory", "disk"] = "memory"
    eval_every: int = 1
    eval_clients: Literal["all", "participants", "sample"] = "all"
    eval_sample: int = 0


@dataclass
class PilotConfig:
    """Pilot: its hyper-parameters and its parts as switches, for the paper's ablations
    (Tables 3-6)."""

    top_m: int = 6  # M of ATA: the M nearest clients mixed into each client's LoRA
    ata_eps: float = 1e-12  # guards d_ki = 0 in the inverse-distance weights
    # LoRA aggregation: topm (ATA) | same_task | all (FedAvg of LoRA = ATA off)
    selection: Literal["topm", "same_task", "all"] = "topm"
    cross_task: bool = True  # cross-task adapters on the foreign experts of CT-MoA
    difference_loss: bool = True  # stage 1's L_d (weight train.lambda_diff)
    aux_losses: bool = True  # stage 2's L_b and L_z (weights train.lambda_balance, lambda_z)
    cross_init: Literal["task_adapter", "random"] = "task_adapter"  # Table 6
    keep_client_adapter: bool = False  # stage 2: x = CT-MoA(H) + psi_s(H), psi_s frozen
    # CT-CLIP (Table 4): every MLP of the CLIP vision tower treated like the connector.
    ct_clip: bool = False


@dataclass
class FedProxConfig:
    mu: float = 0.01  # (mu / 2) * ||w - w_global||^2 added to every local step


@dataclass
class FedAdamConfig:
    """Reddi et al. 2021, Algorithm 2: the server's learning rate, betas and tau (adaptivity)."""

    server_lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    # > 0: a coordinate that no client moved has m = v = 0, and tau = 0 would make it 0/0.
    tau: float = 1e-3
    # The mean of the clients' models that the pseudo-gradient starts from. samples: weighted
    # by the clients' sample counts (this project's choice, as FedAvg weights); uniform: the
    # participants' plain mean, Algorithm 2 as written.
    weighting: Literal["samples", "uniform"] = "samples"


@dataclass
class FedDPAConfig:
    local_weight: float = 0.5  # weight of the local LoRA in the mix with the global one (feddpa.py)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    # 0: E full epochs; > 0: at most this many steps per round (a smoke-size cap).
    max_steps: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    lr_stage1: float = 5e-4
    lr_stage2: float = 5e-4
    # The baselines' learning rate (every strategy but pilot: one plain projector, the
    # connector's stage PLAIN). 0: train.lr_stage2's value, one rate for every round past
    # Pilot's first stage; > 0: a rate of the baselines' own (train/spec.py:lr_field).
    lr_baseline: float = 0.0
    weight_decay: float = 0.0
    lambda_diff: float = 0.1
    lambda_balance: float = 0.1
    lambda_z: float = 0.01
    grad_clip: float = 1.0
    max_new_tokens: int = 16
    # torch: plain AdamW in this process. deepspeed: a DeepSpeed engine per client
    # (ZeRO stage below, optional optimizer offload to CPU), data-parallel over the
    # client's run.ranks_per_client ranks.
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2] = 2  # no 3: stage 3 would shard the frozen base
    offload_optimizer: bool = False
    # Real-scale training (7B on one GPU). batch_size stays the effective batch: each
    # optimiser step takes grad_accum_steps micro-batches of batch_size / grad_accum_steps.
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the LLM layers
    grad_accum_steps: int = 1
    lr_schedule: Literal["constant", "cosine"] = "constant"  # per local round
    warmup_ratio: float = 0.0  # linear warm-up over this fraction of a round's steps (LLaVA-1.5: 0.03)
    # A straggler's budget: a client stops its local round after this many seconds (0: no
    # limit) and its update counts with the samples it saw. Wall-clock: runs that hit it
    # are not reproducible bitwise. torch engine only.
    max_local_seconds: float = 0.0


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


# Keys whose listed default does what a config without the key does: left out of both
# hashes while at that default, so a run recorded without the key keeps its config_hash
# (launch's finished and reused runs, tools/study) and its checkpoints their result_hash.
# Set to anything else, the key is hashed like any other.
UNHASHED_AT_DEFAULT = {"fedadam.weighting": "samples", "run.restart": False, "fl.transforms": [],
                       "train.lr_baseline": 0.0, "data.unseen_combos": "", "data.eval_subsets": [],
                       "data.eval_interim_samples": 0, "model.family": "",
                       "fl.clients_per_round": 0.0, "fl.sampling": "uniform", "fl.on_client_error": "abort",
                       "fl.eval_every": 1, "fl.eval_clients": "all", "fl.eval_sample": 0,
                       "fl.client_state": "memory",
                       "train.max_local_seconds": 0.0}


def _hashed(config: dict[str, Any]) -> dict[str, Any]:
    out = {section: dict(values) for section, values in config.items()}
    for key, default in UNHASHED_AT_DEFAULT.items():
        section, name = key.split(".")
        if name in out.get(section, {}) and out[section][name] == default:
            del out[section][name]
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
}


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
# with exclude). The eval_* keys choose which clients are evaluated when, never what trains;
# client_state only where the states wait (read back bitwise).
NON_RESULT_FIELDS = {"run.output_dir", "run.cache_dir", "run.log_every", "run.resume", "run.restart",
                     "fl.rounds", "fl.chunk_mb",
                     "data.num_workers", "data.on_bad_sample", "fl.on_client_error",
                     "fl.eval_every", "fl.eval_clients", "fl.eval_sample", "fl.client_state", "run.tensorboard", "run.wandb_project"}


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
