"""The Pilot connector that replaces LLaVA's projector (docs/method.md, stages 1 and 2).

Stage 0 is the base model as it arrives (only psi_t, which starts as a copy of the
pretrained projector): the round-0 evaluation. Stage 1 adds a client-specific adapter
and the difference loss; stage 2 is the cross-task mixture of adapters (CT-MoA).
Auxiliary losses of the last forward are left in `self.aux` for the trainer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pilot_hpc.config import PilotConfig
from pilot_hpc.model.ctmoa import AdapterWeights, load_balance_loss, mlp_expert_index, router_reference, z_loss
from pilot_hpc.model.ctmoa_dispatch import ctmoa


# The baselines' stage: the projector alone, trained like LLaVA's own.
PLAIN = 3


def difference_loss(x_t: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
    """Soft orthogonality of task and client features, in the N x N Gram form.

    x_t, x_s: [B, N, C]. Rows are L2-normalised with detached norms (as in the release)
    and the mean of the squared entries of x_t^T x_s (C x C) is taken, computed as
    sum((A A^T) * (B B^T)) / C^2 so that no C x C matrix is formed (at LLaVA sizes
    C x C per sample is 16M entries; N x N is 0.33M).
    """
    a = x_t.float() / (x_t.float().norm(dim=-1, keepdim=True).detach() + 1e-6)  # [B, N, C]
    b = x_s.float() / (x_s.float().norm(dim=-1, keepdim=True).detach() + 1e-6)
    gram_a = a @ a.transpose(1, 2)  # [B, N, N]
    gram_b = b @ b.transpose(1, 2)
    c = x_t.shape[-1]
    return ((gram_a * gram_b).sum(dim=(1, 2)) / (c * c)).mean()


def adapter_weights(adapter: nn.Module) -> AdapterWeights:
    return AdapterWeights(adapter.linear_1.weight, adapter.linear_1.bias, adapter.linear_2.weight, adapter.linear_2.bias)


class PilotConnector(nn.Module):
    def __init__(self, projector: nn.Module, num_tasks: int, own_task: int, *, pilot: PilotConfig | None = None,
                 ctmoa_impl: str = "auto", seed: int = 0):
        """pilot: the ablation switches (config section `pilot`); None for the full method."""
        super().__init__()
        if not 0 <= own_task < num_tasks:
            raise ValueError(f"own task id {own_task} out of range for {num_tasks} tasks")
        self.num_tasks = num_tasks
        self.own_task = own_task
        self.switches = pilot if pilot is not None else PilotConfig()
        self.ctmoa_impl = ctmoa_impl
        # The CT-MoA reference and kernels compute GELU MLPs (LLaVA's projector); other
        # MLPs (CLIP's quick_gelu, CT-CLIP) are mixed through their own modules.
        self.activation = getattr(projector, "activation_name", "gelu")
        self.seed = seed
        # Every adapter starts as the pretrained projector (docs/method.md).
        self.task_adapter = copy.deepcopy(projector)  # psi_t, expert 1 in stage 2
        self.client_adapter = copy.deepcopy(projector)  # psi_s
        self.foreign = nn.ModuleList(copy.deepcopy(projector) for _ in range(num_tasks - 1))  # psi_2..psi_T
        self.cross = nn.ModuleList(copy.deepcopy(projector) for _ in range(num_tasks - 1))  # psi_c_2..psi_c_T
        cv = projector.linear_1.in_features
        self.router = nn.Linear(cv, num_tasks, bias=False)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=gen) * 0.02)
        # Whether the cross-task adapters were initialised (stage-2 entry): a buffer, so
        # it travels with the client's state through swaps and checkpoints.
        self.register_buffer("cross_initialised", torch.zeros((), dtype=torch.bool))
        self.stage = 0
        self.aux: dict[str, torch.Tensor] = {}
        # A flattened token list (a 2-D input: families whose images yield different
        # numbers of visual tokens, docs/method.md) holds these many tokens per image, in
        # order; its family sets them before each forward. None: one image.
        self.segments: list[int] | None = None

    @property
    def cross_ready(self) -> bool:
        return bool(self.cross_initialised)

    # ------------------------------------------------------------------ task ids
    def foreign_tasks(self) -> list[int]:
        """Task ids of experts 2..T, in task-id order."""
        return [t for t in range(self.num_tasks) if t != self.own_task]

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: int) -> None:
        """0: the base model (nothing trains); 1, 2: Pilot's stages; PLAIN: LLaVA's own
        projector (psi_t alone) trained, for the baselines (FedAvg, FedProx, ...)."""
        trainable = {
            0: (),
            1: ("task_adapter", "client_adapter"),
            2: ("task_adapter", "cross", "router") if self.switches.cross_task else ("task_adapter", "router"),
            PLAIN: ("task_adapter",),
        }
        if stage not in trainable:
            raise ValueError(f"stage must be one of {sorted(trainable)}, got {stage}")
        self.stage = stage
        trainable = trainable[stage]
        for name, module in self.named_children():
            for p in module.parameters():
                p.requires_grad_(name in trainable)

    def init_cross_adapters(self) -> None:
        """Stage-2 entry: cross-task adapters from the own task adapter, or at random."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for module in self.cross:
                if self.switches.cross_init == "task_adapter":
                    module.load_state_dict(self.task_adapter.state_dict())
                else:  # "random": nn.Linear's default init, from a seeded generator
                    for lin in (module.linear_1, module.linear_2):
                        bound = 1.0 / lin.in_features ** 0.5
                        lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=gen))
                        if lin.bias is not None:
                            lin.bias.copy_(torch.empty_like(lin.bias).uniform_(-bound, bound, generator=gen))
            self.cross_initialised.fill_(True)

    # ------------------------------------------------------------------ forward
    def expert_modules(self) -> list[nn.Module]:
        """The 2T-1 MLP modules in the order of ctmoa_adapters()."""
        if not self.switches.cross_task:
            return [self.task_adapter, *self.foreign]
        return [self.task_adapter] + [m for pair in zip(self.foreign, self.cross) for m in pair]

    def module_mixture(self, h: torch.Tensor, expert_of: list[int]):
        """The CT-MoA mixture with each MLP's own forward (any activation), in eager
        PyTorch: the same router and the same float32 accumulation as the reference."""
        probs, stats = router_reference(h, self.router.weight)
        out = None
        for module, e in zip(self.expert_modules(), expert_of):
            term = probs[..., e:e + 1] * module(h).float()
            out = term if out is None else out + term
        return out.to(h.dtype), stats

    def ctmoa_adapters(self) -> tuple[list[AdapterWeights], list[int]]:
        """(MLPs, their router experts): psi_1, then (psi_i, psi_c_i) per foreign task, in
        the order of mlp_expert_index; without cross-task adapters psi_1..psi_T, one each."""
        mlps = [adapter_weights(self.task_adapter)]
        if not self.switches.cross_task:
            return mlps + [adapter_weights(f) for f in self.foreign], list(range(self.num_tasks))
        for foreign, cross in zip(self.foreign, self.cross):
            mlps += [adapter_weights(foreign), adapter_weights(cross)]
        return mlps, mlp_expert_index(self.num_tasks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, N, Cv], or [N, Cv] flattened
        """The dtype boundary: the adapters are float32 master weights (model/build.py)
        in a model of any dtype, so the vision features come in as float32 and the
        output leaves in the features' dtype (both no-ops in a float32 model).

        A flattened token list ([N, Cv], every image's tokens one after another) is
        mixed per token like a batch of one; the difference loss is then taken per image
        over that image's tokens (self.segments) and averaged over the images. With a
        batch of crops ([crops, N, Cv], any-resolution families) self.segments counts
        each image's crops, and the loss is per image over all its crops' tokens."""
        dtype = h.dtype
        if h.dim() == 2:
            return self._forward(h.to(self.router.weight.dtype)[None], self.segments)[0].to(dtype)
        if self.segments is not None:  # [crops, N, Cv]: self.segments crops (rows) per image
            if sum(self.segments) != h.shape[0]:
                raise ValueError(f"the connector was told {sum(self.segments)} rows of images, got {h.shape[0]}")
            tokens = [n * h.shape[1] for n in self.segments]
            return self._forward(h.to(self.router.weight.dtype), tokens).to(dtype)
        return self._forward(h.to(self.router.weight.dtype)).to(dtype)

    def _forward(self, h: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
        if self.stage in (0, PLAIN):
            self.aux = {}
            return self.task_adapter(h)
        if self.stage == 1:
            x_t = self.task_adapter(h)  # [B, N, C]
            x_s = self.client_adapter(h)
            if not self.switches.difference_loss:
                self.aux = {}
            elif segments is None:
                self.aux = {"diff": difference_loss(x_t, x_s)}
            else:  # the loss per image over its tokens (of all its rows), then their mean
                c = x_t.shape[-1]
                parts = zip(x_t.reshape(-1, c).split(segments), x_s.reshape(-1, c).split(segments))
                self.aux = {"diff": torch.stack([difference_loss(a[None], b[None]) for a, b in parts]).mean()}
            return x_t + x_s
        mlps, expert_of = self.ctmoa_adapters()
        if self.activation == "gelu":
            res = ctmoa(h, self.router.weight, mlps, expert_of, impl=self.ctmoa_impl)
            out, stats = res.out, res.stats
        else:
            out, stats = self.module_mixture(h, expert_of)
        self.aux = {"balance": load_balance_loss(stats), "z": z_loss(stats)} if self.switches.aux_losses else {}
        if self.switches.keep_client_adapter:
            out = out + self.client_adapter(h)
        return out
