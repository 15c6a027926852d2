"""The strategy contract: a client-side policy and a server-side aggregator, registered
in pairs by name (no if/elif ladder over algorithm names).

ClientPolicy (runs on every client's rank): prepares the model, names the stage of a
round, adds loss terms to local training, says which parameters leave the client in
each part of its update (pilot_hpc.fl.update), and installs what comes back.

Aggregator (runs on the server, rank 0): which clients take part in a round (a pure
function of the seed and the round), the linear mixing plan, the element-wise server
step applied chunk by chunk, and the state the server keeps across rounds.

A strategy whose aggregator is None exchanges nothing (local training, centralized).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pilot_hpc.config import ConfigError
from pilot_hpc.errors import CheckpointError
from pilot_hpc.fl import aggregate, participation
from pilot_hpc.fl.flat import flatten
from pilot_hpc.fl.update import Part

REGISTRY: dict[str, tuple[type["ClientPolicy"], type["Aggregator"] | None]] = {}


def register(name: str, policy: type["ClientPolicy"], aggregator: type["Aggregator"] | None) -> None:
    REGISTRY[name] = (policy, aggregator)


@dataclass
class MixPlan:
    """How the server mixes the stacked updates: every aggregation is linear in the
    clients' updates (then an optional element-wise step, see Aggregator.finish), so the
    streamed exchange can apply it to one column chunk at a time."""

    shared: torch.Tensor  # [S, K] float64: shared row s = sum_k shared[s, k] * shared_by_task_k (NaN row: none)
    personal: torch.Tensor  # [K, K] float64: client k's personal = sum_j personal[k, j] * personal_j (NaN row: none)
    excluded: list[int] = field(default_factory=list)  # clients left out (non-finite update)


@dataclass
class ServerResult:
    shared: torch.Tensor  # [S, P_shared]: broadcast to every client (e.g. the T task adapters)
    personal: torch.Tensor  # [K, P_personal]: row k goes to client k only
    excluded: list[int] = field(default_factory=list)  # clients left out (non-finite update)


class ClientPolicy:
    """What a client trains, what it sends, and how it installs the server's answer.

    The parts are lists of live parameters in a fixed order, so flattening and
    installing are slices of one buffer."""

    pooled = False  # True: one model trains on every client's data, so the run needs one process

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare_model(self, pm) -> None:
        """Changes to the freshly built model before any state is taken (e.g. FedDPA's
        second, local LoRA). Runs on every rank, in the same way, before training."""

    def stage(self, round_: int) -> int:
        raise NotImplementedError

    def local_jobs(self, slots: list) -> list[tuple]:
        """(client, training set) pairs of a round's local training on this rank: by
        default every client on its own data."""
        return [(slot, slot.train) for slot in slots]

    def after_local(self, slots: list) -> None:
        """After this rank's local training finished (not after an interruption)."""

    def begin_round(self, pm, round_: int, start_state: dict[str, torch.Tensor]) -> None:
        """Set-up before local training (e.g. entering stage 2). Also called when an
        interrupted round resumes, so it must be idempotent; start_state is the client's
        state at the round's start (its `get_state()` keys)."""

    def extra_loss(self, pm) -> dict[str, torch.Tensor]:
        """Terms added to each local step's loss (FedProx's proximal term)."""
        return {}

    def shared_params(self, pm) -> list[torch.Tensor]:
        """The part the server mixes per task and broadcasts (Part.SHARED_BY_TASK)."""
        raise NotImplementedError

    def personal_params(self, pm) -> list[torch.Tensor]:
        """The part the server mixes per client and returns to that client (Part.PERSONAL)."""
        raise NotImplementedError

    def install(self, pm, shared: torch.Tensor, personal: torch.Tensor | None) -> None:
        """Puts the server's answer into the hosted client: `shared` [S, P_shared] (every
        task's row), `personal` [P_personal] (this client's row; None: it has none this
        round, a client that did not take part under an aggregator without a global
        personal row). A NaN row means "no answer for it this round": the client keeps
        what it has. Each finite row overwrites what it installs into (lazy installs,
        fl/installs.py, install only each row's latest value)."""
        raise NotImplementedError

    def install_start(self, pm, rows: int) -> torch.Tensor:
        """[rows, P_shared]: the hosted client's current values of what each shared row
        would install into (a lossy fl.codec sends changes, and a client adds each mixed
        change to these, taken at its round's start). By default every row installs into
        shared_params."""
        return flatten(self.shared_params(pm))[None, :].expand(rows, -1)

    def sat_out(self, pm, round_: int) -> None:
        """After a round the hosted client did not take part in, once the server's answer
        is installed: bring it to the round's stage, so that it is evaluated (and later
        trains) as a participant would be (Pilot: enter stage 2). Lazy installs
        (fl/installs.py) call it once for several rounds: it must depend only on the
        round's stage, and in a stage's later rounds only repeat what it did in the first."""


class Aggregator:
    """The server's side: participation, the mixing plan, the server step, its state."""

    # plan() wants the K x K Gram matrix of the personal updates (the streamed exchange
    # then makes a first pass over them to build it).
    needs_gram = False
    # Every personal row of a plan is the same global row (FedAvg and its kin: one global
    # model). When some client did not send, the exchange then also broadcasts that row,
    # so that a client which sat the round out holds the global model, as a client
    # sampled later must start from it. Per-client rows (Pilot's ATA) are not spread.
    global_personal = False
    # fl.lora_rank_rule=stack (fl/stack.py): the exchange packs the personal rows (the LoRA)
    # into stacked factors that every rank merges into its base, instead of mixing them;
    # such an aggregator has `spans` (the LoRA modules) and `ranks` (every client's rank).
    stacks_lora = False

    def __init__(self, cfg):
        # The exchange mixes the clients' changes from the round's start, not their
        # parameters (a lossy fl.codec, fl/coded.py): finish() then sees mixed changes.
        self.mixes_changes = cfg.fl.sends_changes()
        # The round being aggregated: set by the federation before each exchange (a server
        # step that draws per-round randomness seeds it with this, e.g. privacy.where=server).
        self.round = 0
        self.cfg = cfg
        self.num_clients = cfg.fl.num_clients
        self.num_tasks = len(cfg.tasks)
        self.tasks = torch.tensor([cfg.tasks.index(t) for t in cfg.fl.client_tasks])  # [K] task ids

    def shared_rows(self) -> int:
        raise NotImplementedError

    def attach(self, pm) -> None:
        """Every rank, once the model is built: what the aggregator needs to know of the
        parameters' shapes (every client's are the same), e.g. where each LoRA module's
        factors sit in the personal row. Most aggregators need nothing."""

    def round_record(self) -> dict:
        """Rank 0, after the round's exchange: what the server chose, for the round's entry
        in metrics.json (e.g. ATA's neighbours). Most aggregators record nothing."""
        return {}

    def gram_accumulator(self, k: int, device):
        """When needs_gram: an object with feed(rows [K, c], col) over the personal part's
        column chunks in order, and result() -> [K, K] float64, that gives the "Gram"
        matrix whose G_kk + G_ii - 2 G_ki are the plan's squared distances. None: the
        Gram matrix of the flat rows (the exchange's centred pass)."""
        return None

    def select(self, round_: int) -> torch.Tensor:
        """[K] bool: the clients that take part in `round_`, a pure function of the run's
        seed and the round, so every rank (and a resumed run) computes the same set
        without a message: fl.clients_per_round and fl.sampling (every client by default)."""
        return participation.selected(self.cfg, round_)

    def plan(self, n: torch.Tensor, good: torch.Tensor, gram: torch.Tensor | None) -> MixPlan:
        """The mixing coefficients from the sample counts [K], the good-client mask [K]
        (taking part and finite) and, when needs_gram, the float64 Gram matrix of the
        personal updates."""
        raise NotImplementedError

    def finish(self, part: Part, rows: torch.Tensor, offset: int) -> None:
        """An element-wise server step on mixed rows, in place: `rows` [R, c] are columns
        offset .. offset + c of `part`. Called once per column chunk, in order (FedAdam's
        optimizer step lives here)."""

    def init_server(self, parts: dict[Part, torch.Tensor]) -> None:
        """Rank 0, before round 1: the common initial update (what every client starts from)."""

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server keeps across rounds (checkpointed); most aggregators keep nothing."""
        return {}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise CheckpointError(f"{type(self).__name__} keeps no server state, but the checkpoint has {sorted(state)}")

    def aggregate(self, shared: torch.Tensor, personal: torch.Tensor, n: torch.Tensor) -> ServerResult:
        """The whole server step on [K, P] tensors in one go: the reference that the streamed
        exchange must match. A client whose row holds NaN/Inf is excluded."""
        good = aggregate.finite_rows(shared) & aggregate.finite_rows(personal)
        gram = None
        if self.needs_gram:
            rows = aggregate.zero_bad_rows(personal, good)
            acc = self.gram_accumulator(rows.shape[0], rows.device)
            if acc is None:
                gram = aggregate.gram_matrix(rows)
            else:
                acc.feed(rows, 0)
                gram = acc.result()
        plan = self.plan(n, good, gram)
        mixed_shared, mixed_personal = aggregate.mix(plan.shared, shared, good), aggregate.mix(plan.personal, personal, good)
        self.finish(Part.SHARED_BY_TASK, mixed_shared, 0)
        self.finish(Part.PERSONAL, mixed_personal, 0)
        return ServerResult(shared=mixed_shared, personal=mixed_personal, excluded=plan.excluded)


@dataclass
class Strategy:
    """A registered pair: the client policy and the aggregator (None: no exchange)."""

    name: str
    policy: ClientPolicy
    aggregator: Aggregator | None

    @property
    def communicates(self) -> bool:
        return self.aggregator is not None

    @property
    def pooled(self) -> bool:
        return self.policy.pooled


def get_strategy(name: str, cfg) -> Strategy:
    if name not in REGISTRY:
        raise ConfigError(f"fl.strategy: unknown strategy {name!r}; valid: {sorted(REGISTRY)}")
    policy, aggregator = REGISTRY[name]
    if aggregator is not None and cfg.privacy.where == "server":
        from pilot_hpc.fl.privacy import with_server_noise  # only runs with server noise need it

        aggregator = with_server_noise(aggregator)
    return Strategy(name=name, policy=policy(cfg), aggregator=aggregator(cfg) if aggregator is not None else None)
