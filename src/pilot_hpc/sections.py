"""The config's sections, one dataclass each, validated in `__post_init__` with fix-it
messages naming the key. `pilot_hpc.config` assembles them into `Config` (cross-section
checks, hashing, loading) and re-exports them; like it, this module loads with the
standard library alone, before torch and MPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    # Heterogeneous LoRA ranks (fl.lora_rank_rule): each client's rank, as a list of
    # fl.num_clients ranks or as {task: rank}; both empty: every client model.lora_r. The
    # shared model holds LoRA at model.lora_r, which must then be the largest rank.
    lora_ranks: list[int] = field(default_factory=list)
    lora_task_ranks: dict[str, int] = field(default_factory=dict)
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
    # The codec of what clients send (fl/codecs.py): float32 (the default: fl.wire_dtype
    # decides, as before), bfloat16 (the same as fl.wire_dtype=bfloat16), or the blockwise
    # int8 / int4 (one float32 absmax scale per 128 values: ~3.9x / ~7.5x fewer bytes than
    # float32). int8 and int4 send the change from the round's start with client-side
    # error feedback (docs/method.md, "Compressed updates").
    codec: Literal["float32", "bfloat16", "int8", "int4"] = "float32"
    # The codec of what the server sends back; empty: the same as fl.codec.
    codec_down: Literal["", "float32", "bfloat16", "int8", "int4"] = ""
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
    # Clients of different LoRA ranks (model.lora_ranks): zero_pad (HetLoRA) mixes the rows
    # padded to the largest rank and truncates each client's back to its rank on install;
    # stack (FLoRA, fl/stack.py; fl.strategy fedavg / fedprox only) stacks the clients'
    # factors so that their weighted product is exact, merges it into the shared base
    # weights every round and restarts each client's LoRA at B = 0.
    lora_rank_rule: Literal["zero_pad", "stack"] = "zero_pad"
    eval_every: int = 1
    eval_clients: Literal["all", "participants", "sample"] = "all"
    eval_sample: int = 0
    # A client whose hosted model and test items equal those of a client evaluated before it
    # on the same rank takes that client's answers instead of generating them again
    # (fl/participation.py:answers_key): FedAvg-like strategies generate once per task.
    eval_reuse: bool = True

    def __post_init__(self):
        if self.codec != "float32" and self.wire_dtype != "float32" and self.codec != self.wire_dtype:
            raise ConfigError(f"fl.codec={self.codec} and fl.wire_dtype={self.wire_dtype} disagree: fl.wire_dtype is "
                              "the older name of a bfloat16 codec; set fl.codec alone")

    def codecs(self) -> tuple[str, str]:
        """(up, down): the codecs in effect, fl.wire_dtype read as the codec it names."""
        up = self.wire_dtype if self.codec == "float32" else self.codec
        return up, self.codec_down or up

    def sends_changes(self) -> bool:
        """Whether updates travel as changes from the round's start through the encoded
        exchange (fl/coded.py): a lossy integer codec, or different codecs each way."""
        up, down = self.codecs()
        return up != down or up in ("int8", "int4")


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
    # ATA's distances between clients' LoRA: params = of the flattened LoRA parameters
    # (the paper); product = of the LoRA products dW = (alpha / r) B A per module, summed
    # over modules, computed without forming them (fl/lora_distance.py): defined whatever
    # each client's rank, and blind to the factors' gauge (B M, M^-1 A).
    distance: Literal["params", "product"] = "params"

    def __post_init__(self):
        if self.distance == "product" and self.selection != "topm":
            raise ConfigError(f"pilot.distance=product chooses ATA's nearest clients, which only "
                              f"pilot.selection=topm uses (got {self.selection}); set pilot.selection=topm or "
                              "leave pilot.distance at params")


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


# Strategies whose server step is one weighted sum of what leaves the clients (FedAvg's
# server: FedAvg, FedProx, FedAdam; Shepherd's and FedDPA's never-sent parts, the projector
# and the local LoRA, stay out of the exchange), so secure aggregation can hide the rows;
# the others and why they cannot (a unit test keeps this list equal to the registry's).
SECURE_SUM_STRATEGIES = ("fedavg", "fedprox", "fedadam", "shepherd", "feddpa")
SECURE_SUM_REFUSED = {
    "pilot": "Pilot's ATA mixes each client's LoRA with its nearest clients by the distances between their "
             "individual updates, and its task adapters are averaged per task, while secure aggregation lets the "
             "server see only one masked sum",
    "local": "fl.strategy=local exchanges nothing, so there is no sum to protect",
    "centralized": "fl.strategy=centralized pools every client's data in one process and exchanges nothing",
}


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (pilot_hpc.fl.privacy; docs/method.md, Privacy).
    where=none (the default) changes nothing."""

    # none; server: each client clips the change of its update, the server adds Gaussian
    # noise to the sum (a trusted server; fedavg, fedprox, fedadam); client: each client
    # also adds the noise to its own clipped change before it leaves (local DP, any
    # strategy that exchanges updates).
    where: Literal["none", "server", "client"] = "none"
    # C: the L2 bound of one client's change over the round, all its sent parts jointly.
    clip_norm: float = 1.0
    # z: the noise's standard deviation is z * C (on the sum: where=server; on each
    # client's change: where=client). 0 with target_epsilon 0: clipping only, no guarantee.
    noise_multiplier: float = 0.0
    # > 0: solve z for this epsilon at `delta` over fl.rounds rounds (noise_multiplier then 0).
    target_epsilon: float = 0.0
    delta: float = 1e-5
    # The accountant of pilot_hpc.fl.accounting: rdp (Renyi DP) or pld (privacy loss distributions).
    accountant: Literal["rdp", "pld"] = "rdp"
    # > 0: the run stops before the first round whose cumulative epsilon would exceed it.
    epsilon_budget: float = 0.0
    # true: pairwise-masked secure aggregation (fl/secagg.py): the server (rank 0) sees only
    # masked fixed-point rows and their weighted sum (SECURE_SUM_STRATEGIES only).
    secure_aggregation: bool = False
    # Adaptive clipping (Andrew et al. 2021; where=server only): clip_norm is then C_0 and
    # after each round C <- C exp(-clip_lr (b - clip_quantile)), b the noisy share of the
    # participants whose change was within C. clip_count_stddev is the std of the noise on
    # that count (0: expected participants per round / 20, the paper's choice); the updates'
    # noise then grows so that the two together are still accounted as multiplier z.
    adaptive_clip: bool = False
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0

    def __post_init__(self):
        if self.where != "none" and self.noise_multiplier > 0 and self.target_epsilon > 0:
            raise ConfigError(f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon="
                              f"{self.target_epsilon}: give one of them (the other is solved from it), set the other "
                              "to 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must lie in (0, 1), got {self.delta} (1e-5, or below 1 / the number of "
                              "clients, is usual)")


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
