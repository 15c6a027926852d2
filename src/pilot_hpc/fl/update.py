"""What leaves a client in a round: one typed update, built in one place.

A client's update has parts named by the role the server gives them:
  shared_by_task  mixed per task and broadcast (Pilot's task adapters, FedAvg's projector)
  personal        mixed per client and sent back to that client only (the LoRA)
Each part is one flat row, in the order the client policy lists its parameters, so
installing a mixed row is a slice copy. `status` says whether the client takes part in
this round's aggregation, which is not the same as whether its numbers are finite: a
client the aggregator did not select sends nothing at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from pilot_hpc.codes import CodedEnum
from pilot_hpc.fl.flat import flatten


class Part(str, enum.Enum):
    SHARED_BY_TASK = "shared_by_task"
    PERSONAL = "personal"


# The wire order of the parts: a row is [shared_by_task | personal].
PARTS = (Part.SHARED_BY_TASK, Part.PERSONAL)


class Participation(CodedEnum):
    PARTICIPATED = "participated"
    NOT_SELECTED = "not_selected"  # the aggregator left it out of this round: sends nothing
    EXCLUDED_NONFINITE = "excluded_nonfinite"  # trained, but its update holds NaN/Inf: travels as zeros
    DROPPED = "dropped"  # its local round raised (fl.on_client_error=exclude): travels as zeros

    @property
    def sends(self) -> bool:
        """Whether the update occupies a row in the exchange (a non-finite or dropped one
        still does: the row counts follow the round's selection, which every rank knows
        without a message, while a failure is known only on its own rank)."""
        return self is not Participation.NOT_SELECTED


class Form(enum.Enum):
    PARAMS = "params"  # the parameters themselves (every strategy today)
    DELTA = "delta"  # the change from the round's start (room for DP clipping and lossy codecs)


@dataclass
class ClientUpdate:
    client: int
    parts: dict[Part, torch.Tensor]  # part -> flat row
    num_samples: int
    status: Participation
    form: Form = Form.PARAMS
    round: int = 0
    # The same parts at the round's start (what the client installed before training), for
    # transforms that work on the change (Transform.needs_start); None otherwise.
    start: dict[Part, torch.Tensor] | None = None
    # A lossy fl.codec: the client's error-feedback residual by part name (the Codec
    # transform reads and replaces it); None otherwise.
    residual: dict[str, torch.Tensor] | None = None
    # The L2 norm of its change over all parts before the privacy clip (set by ClientDP).
    change_norm: float | None = None

    def widths(self) -> tuple[int, ...]:
        return tuple(self.parts[p].numel() for p in PARTS)

    def delta(self, part: Part) -> torch.Tensor:
        """The part's change over the round (needs `start`)."""
        if self.start is None:
            raise RuntimeError(f"client {self.client}: the update carries no round-start rows; a transform that "
                               "works on the change must set needs_start = True")
        return self.parts[part] - self.start[part]

    def row(self) -> torch.Tensor:
        """The wire row: every part in PARTS order."""
        return torch.cat([self.parts[p].reshape(-1) for p in PARTS])


def part_params(policy, pm) -> dict[Part, list[torch.Tensor]]:
    """The live parameters behind each part of `policy`'s update of the hosted client."""
    return {Part.SHARED_BY_TASK: policy.shared_params(pm), Part.PERSONAL: policy.personal_params(pm)}


def part_widths(policy, pm) -> tuple[int, ...]:
    params = part_params(policy, pm)
    return tuple(sum(t.numel() for t in params[p]) for p in PARTS)


def build_update(policy, pm, client: int, num_samples: int, status: Participation, round_: int,
                 device: torch.device | str = "cpu") -> ClientUpdate:
    """The update of the client hosted in `pm` (its parameters, flattened on `device`).
    A client that sends nothing or whose update is non-finite gets zero rows: they hold
    the place of its row without its numbers."""
    params = part_params(policy, pm)
    if status is Participation.PARTICIPATED:
        parts = {p: flatten(params[p], device=device) for p in PARTS}
    else:
        parts = {p: torch.zeros(sum(t.numel() for t in params[p]), device=device) for p in PARTS}
    return ClientUpdate(client=client, parts=parts, num_samples=num_samples, status=status, round=round_)
