"""The strategy contract and its registry (no if/elif ladder over algorithm names)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pilot_hpc.config import ConfigError
from pilot_hpc.fl import aggregate

REGISTRY: dict[str, type["Strategy"]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def get_strategy(name: str, cfg) -> "Strategy":
    if name not in REGISTRY:
        raise ConfigError(f"fl.strategy: unknown strategy {name!r}; valid: {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


@dataclass
class MixPlan:
    """How the server mixes the stacked updates: every strategy's aggregation is linear
    in the clients' updates (then an optional element-wise step, see Strategy.finish),
    so the streamed exchange can apply it to one column chunk at a time."""

    shared: torch.Tensor  # [S, K] float64: shared row s = sum_k shared[s, k] * visual_k (NaN row: none)
    personal: torch.Tensor  # [K, K] float64: client k's text = sum_j personal[k, j] * text_j (NaN row: none)
    excluded: list[int] = field(default_factory=list)  # clients left out (non-finite update)


@dataclass
class ServerResult:
    shared: torch.Tensor  # [S, Pv]: broadcast to every client (e.g. the T task adapters)
    personal: torch.Tensor  # [K, Pt]: row k goes to client k only
    excluded: list[int] = field(default_factory=list)  # clients left out (non-finite update)


class Strategy:
    """What a client sends, how the server mixes it, and how a client installs the result.

    A client's update has two parts that the server treats differently: `visual`
    (connector adapters) and `text` (LoRA). Both are lists of live parameters in a
    fixed order, so flattening and installing are slices of one buffer.
    """

    name = "base"
    communicates = True  # False: no exchange at all (local training, centralized)
    pooled = False  # True: one model trains on every client's data, so the run needs one process

    def local_jobs(self, slots: list) -> list[tuple]:
        """(client, training set) pairs of a round's local training on this rank: by
        default every client on its own data."""
        return [(slot, slot.train) for slot in slots]

    def after_local(self, slots: list) -> None:
        """After this rank's local training finished (not after an interruption)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare_model(self, pm) -> None:
        """Changes to the freshly built model before any state is taken (e.g. FedDPA's
        second, local LoRA). Runs on every rank, in the same way, before training."""

    def stage(self, round_: int) -> int:
        raise NotImplementedError

    def visual_params(self, pm) -> list[torch.Tensor]:
        raise NotImplementedError

    def text_params(self, pm) -> list[torch.Tensor]:
        raise NotImplementedError

    def shared_rows(self, num_tasks: int) -> int:
        raise NotImplementedError

    def begin_round(self, pm, round_: int, start_state: dict[str, torch.Tensor]) -> None:
        """Client-side set-up before local training (e.g. entering stage 2). Also called
        when an interrupted round resumes, so it must be idempotent; start_state is the
        client's state at the round's start (its `get_state()` keys)."""

    # Server side. needs_gram: plan() wants the K x K Gram matrix of the text updates
    # (the streamed exchange then makes a first pass over them to build it).
    needs_gram = False

    def plan(self, n: torch.Tensor, tasks: torch.Tensor, num_tasks: int, good: torch.Tensor,
             gram: torch.Tensor | None) -> MixPlan:
        """The mixing coefficients from the sample counts, tasks, good-client mask [K] and,
        when needs_gram, the float64 Gram matrix of the text updates."""
        raise NotImplementedError

    def finish(self, part: str, rows: torch.Tensor, offset: int) -> None:
        """An element-wise server step on mixed rows, in place: `rows` [R, c] are columns
        offset .. offset + c of `part` ("visual" or "text"). Called once per column chunk,
        in order (FedAdam's optimizer step lives here)."""

    def aggregate(self, visual: torch.Tensor, text: torch.Tensor, n: torch.Tensor, tasks: torch.Tensor,
                  num_tasks: int) -> ServerResult:
        """The whole server step on [K, P] tensors in one go: the reference that the streamed
        exchange must match. A client whose row holds NaN/Inf is excluded."""
        good = aggregate.finite_rows(visual) & aggregate.finite_rows(text)
        gram = None
        if self.needs_gram:
            gram = aggregate.gram_matrix(aggregate.zero_bad_rows(text, good))
        plan = self.plan(n, tasks, num_tasks, good, gram)
        shared, personal = aggregate.mix(plan.shared, visual, good), aggregate.mix(plan.personal, text, good)
        self.finish("visual", shared, 0)
        self.finish("text", personal, 0)
        return ServerResult(shared=shared, personal=personal, excluded=plan.excluded)

    def install(self, pm, shared: torch.Tensor, personal: torch.Tensor, round_: int) -> None:
        raise NotImplementedError

    def init_server(self, visual: torch.Tensor, text: torch.Tensor) -> None:
        """Rank 0, before round 1: the common initial update (what every client starts from)."""

    def extra_loss(self, pm) -> dict[str, torch.Tensor]:
        """Terms added to each local step's loss (FedProx's proximal term)."""
        return {}

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server keeps across rounds (checkpointed); Pilot keeps nothing."""
        return {}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no server state, but the checkpoint has {sorted(state)}")
