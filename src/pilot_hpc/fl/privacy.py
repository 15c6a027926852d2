"""Client-level differential privacy (privacy.*; docs/method.md, Privacy).

Each participant's update is cut to its change over the round, all sent parts together
(one flat L2 norm), and clipped to C = privacy.clip_norm; then
  where=client  the client adds N(0, (z C)^2) to every coordinate of its clipped change
                before it leaves (local DP: the server, ATA included, only post-processes);
  where=server  the server adds N(0, (z C)^2) to every coordinate of the SUM of the
                clipped changes, i.e. noise / n_good to the participants' uniform mean
                (a trusted server; strategies whose server step is that mean).
The update still travels as parameters (round start + noisy clipped change), so the
server's mixing is unchanged.

Every noise draw comes from a generator of its own, seeded by the run's seed, the round
and the client (client side) or the part and its NOISE_BLOCK-aligned column block (server
side), on the CPU: the numbers do not depend on the number of ranks, on fl.chunk_mb or
on the device, and a resumed round draws them again bitwise.

Epsilon is a pure function of (z, participation rate, rounds, delta): pilot_hpc.fl.accounting,
imported only when privacy.where != none (a run without privacy does not load dp_accounting).

Adaptive clipping (privacy.adaptive_clip, where=server; Andrew et al. 2021): C moves each
round by the geometric rule of next_clip, from a noisy count of the participants whose
change was within C. The count's noise (sigma_b) and a larger noise on the updates
(z_delta, update_multiplier) together are the Gaussian mechanism of multiplier z, so the
accountant's epsilon for z stands. C of a round is a pure function of the run's history
(each round's privacy entry holds the C it used and the next), so a resumed run goes on
bitwise and every rank gets it in one broadcast from rank 0 (share_clip).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

from pilot_hpc.config import ConfigError
from pilot_hpc.fl.participation import participants_count
from pilot_hpc.fl.transforms import Transform, register_transform
from pilot_hpc.fl.update import PARTS, ClientUpdate, Part, Participation

log = logging.getLogger("pilot_hpc.fl")

# Third seed words: keep these streams apart from each other and from participation's.
CLIENT_SALT = 0xD1F0C1
SERVER_SALT = 0xD1F05E
CLIP_SALT = 0xD1F0C0

# Columns per server-side noise block: each block has its own generator and is drawn whole,
# then sliced, so any cut of the columns into calls gets the same numbers.
NOISE_BLOCK = 1 << 14

# Where epsilon is shown: what it does not cover.
OUTSIDE = ("the client-specific parts that never leave a client (Pilot's client adapter, FedDPA's local LoRA) "
           "are outside this guarantee")


# ---------------------------------------------------------------- the numbers of a run


def participation_rate(cfg) -> float:
    """q: the sampling rate the accountant credits. where=server: the share of the clients
    that take part in a round (fl.clients_per_round), which amplifies the guarantee for
    whoever sees the released models without knowing the round's participants. where=client:
    1, because the server, the party that guarantee is against, sees who sent."""
    if cfg.privacy.where == "client":
        return 1.0
    k = cfg.fl.num_clients
    return participants_count(cfg.fl.clients_per_round, k) / k


def noise_multiplier(cfg) -> float:
    """z: privacy.noise_multiplier, or the one solved for privacy.target_epsilon over fl.rounds."""
    from pilot_hpc.fl import accounting

    p = cfg.privacy
    if p.target_epsilon > 0:
        return accounting.calibrate(p.target_epsilon, participation_rate(cfg), cfg.fl.rounds, p.delta, p.accountant)
    return p.noise_multiplier


def epsilon_after(cfg, rounds: int) -> float:
    """Cumulative epsilon at privacy.delta after `rounds` rounds (inf without noise)."""
    from pilot_hpc.fl import accounting

    p = cfg.privacy
    return accounting.epsilon(noise_multiplier(cfg), participation_rate(cfg), rounds, p.delta, p.accountant)


def adaptive(cfg) -> bool:
    return cfg.privacy.adaptive_clip and cfg.privacy.where == "server"  # config.check_privacy refuses the rest


def count_stddev(cfg) -> float:
    """sigma_b: privacy.clip_count_stddev, or (0) the expected participants per round / 20,
    Andrew et al.'s choice: noise of about 5% of the round's clients on the count."""
    p = cfg.privacy
    if p.clip_count_stddev > 0:
        return p.clip_count_stddev
    return participants_count(cfg.fl.clients_per_round, cfg.fl.num_clients) / 20


def update_noise_multiplier(cfg) -> float:
    """The multiplier of the noise on the updates' sum: z, or z_delta with adaptive clipping."""
    z = noise_multiplier(cfg)
    return update_multiplier(z, count_stddev(cfg)) if adaptive(cfg) else z


def round_fields(cfg, round_: int, rows: list[dict] = (), clip: float | None = None) -> dict:
    """The privacy entry of a round in metrics.json ({} when privacy.where=none, so the
    file is as before). epsilon_round: one round's mechanism alone; epsilon: all rounds
    up to this one composed (0 in round 0, which releases nothing). Adaptive clipping
    adds the C the round used (clip_norm), the next round's (clip_norm_next), the noisy
    count and the two noise scales; rows are the round's metrics rows, clip its C."""
    p = cfg.privacy
    if p.where == "none":
        return {}
    entry = {"where": p.where, "clip_norm": p.clip_norm, "noise_multiplier": noise_multiplier(cfg),
             "sampling_rate": participation_rate(cfg), "delta": p.delta, "accountant": p.accountant,
             "epsilon_round": epsilon_after(cfg, 1) if round_ > 0 else 0.0, "epsilon": epsilon_after(cfg, round_)}
    if adaptive(cfg):
        entry.update(clip_fields(cfg, round_, rows, p.clip_norm if clip is None else clip),
                     update_noise_multiplier=update_noise_multiplier(cfg), clip_count_stddev=count_stddev(cfg))
    return {"privacy": entry}


def clip_fields(cfg, round_: int, rows: list[dict], clip: float) -> dict:
    """C of the round, C of the next, and the noisy count between them (none without a good
    participant, round 0 included: C stays). The participants' norms come from the rows."""
    norms = [r["change_norm"] for r in rows if r.get("participation") == "participated" and "change_norm" in r]
    if not norms:
        return {"clip_norm": clip, "clip_norm_next": clip}
    p = cfg.privacy
    noise = count_stddev(cfg) * count_noise(cfg.run.seed, round_)
    nxt, count = next_clip(clip, norms, p.clip_quantile, p.clip_lr, noise)
    return {"clip_norm": clip, "clip_norm_next": nxt, "clip_count": count, "clip_participants": len(norms)}


def share_clip(cfg, world, history: list[dict], transforms, aggregator) -> float:
    """C of the round about to run, on every rank (a collective over `world` with adaptive
    clipping, nothing otherwise): the last history entry's clip_norm_next on rank 0, the
    one rank whose history is complete. It is set on the clipping transform and on the
    server's noise."""
    if not adaptive(cfg):
        return cfg.privacy.clip_norm
    clip = None
    if world.rank == 0:
        clip = history[-1]["privacy"]["clip_norm_next"] if history else cfg.privacy.clip_norm
    clip = float(world.bcast_object(clip))
    for t in transforms.transforms:
        if isinstance(t, ClientDP):
            t.clip = clip
    if isinstance(aggregator, ServerNoise):
        aggregator.dp_clip = clip
    return clip


def norm_column(cfg, slot) -> list[float]:
    """A client's extra column of the metrics gather: the pre-clip norm of the change it
    sent this round (NaN when it sent none); no column without privacy."""
    if cfg.privacy.where == "none":
        return []
    took = slot.took_part is Participation.PARTICIPATED and slot.change_norm is not None
    return [float(slot.change_norm) if took else math.nan]


def norm_width(cfg) -> int:
    return 0 if cfg.privacy.where == "none" else 1


def norm_field(cfg, value: float) -> dict:
    """The metrics row's change_norm from norm_column's gathered value (absent: none sent)."""
    if cfg.privacy.where == "none" or value != value:
        return {}
    return {"change_norm": float(value)}


def log_suffix(cfg, round_: int, rows: list[dict] = (), clip: float | None = None) -> str:
    """The round line's note: cumulative epsilon and what it leaves out (and C, adaptive)."""
    if cfg.privacy.where == "none" or round_ == 0:
        return ""
    note = ""
    if adaptive(cfg):
        f = clip_fields(cfg, round_, rows, cfg.privacy.clip_norm if clip is None else clip)
        note = f"; clip norm {f['clip_norm']:.6g} -> {f['clip_norm_next']:.6g} (adaptive)"
    return (f" | privacy ({cfg.privacy.where}): epsilon {epsilon_after(cfg, round_):.4g} at delta "
            f"{cfg.privacy.delta:g} ({OUTSIDE}){note}")


def log_board(board, cfg, round_: int, clip: float | None = None) -> None:
    if board is None or cfg.privacy.where == "none" or round_ == 0:
        return
    board.scalar("privacy/epsilon", epsilon_after(cfg, round_), round_)
    board.scalar("privacy/epsilon_round", epsilon_after(cfg, 1), round_)
    if adaptive(cfg):
        board.scalar("privacy/clip_norm", cfg.privacy.clip_norm if clip is None else clip, round_)


def over_budget(cfg, round_: int) -> str | None:
    """The message that stops the run before `round_` when privacy.epsilon_budget would be
    exceeded by it; None when it may run."""
    p = cfg.privacy
    if p.where == "none" or p.epsilon_budget <= 0:
        return None
    eps = epsilon_after(cfg, round_)
    if eps <= p.epsilon_budget:
        return None
    return (f"privacy.epsilon_budget={p.epsilon_budget:g}: round {round_} would bring epsilon to {eps:.4g} (delta "
            f"{p.delta:g}), so the run stops after round {round_ - 1} of {cfg.fl.rounds}; its outputs cover the rounds "
            "done. A larger budget, fewer rounds or more noise (privacy.noise_multiplier or target_epsilon) lets it go "
            "further")


def startup_line(cfg) -> str:
    """One line at the start: the mechanism, z (solved or given) and the epsilon of the whole run."""
    p = cfg.privacy
    z = noise_multiplier(cfg)
    how = f"solved for target_epsilon {p.target_epsilon:g}" if p.target_epsilon > 0 else "given"
    clip = f"clipped to {p.clip_norm:g} in L2"
    if adaptive(cfg):
        clip = (f"clipped in L2 to an adaptive C from {p.clip_norm:g} (target quantile {p.clip_quantile:g}, rate "
                f"{p.clip_lr:g}; the count of participants within C gets noise std sigma_b {count_stddev(cfg):.6g} "
                f"and the updates' sum noise std z_delta C with z_delta {update_noise_multiplier(cfg):.6g}, "
                "together multiplier z)")
    return (f"privacy.where={p.where}: updates {clip}, noise multiplier {z:.6g} ({how}), "
            f"sampling rate {participation_rate(cfg):.4g}; epsilon after {cfg.fl.rounds} round(s): "
            f"{epsilon_after(cfg, cfg.fl.rounds):.4g} at delta {p.delta:g} ({p.accountant} accountant); {OUTSIDE}")


def check(cfg) -> None:
    """Startup check (every rank, before training): the noise multiplier can be solved,
    and with adaptive clipping split between the count and the updates."""
    p = cfg.privacy
    if p.where == "none":
        return
    try:
        z = noise_multiplier(cfg)
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ConfigError(f"privacy.target_epsilon={p.target_epsilon}: no noise multiplier reaches it over "
                          f"fl.rounds={cfg.fl.rounds} at privacy.delta={p.delta} ({err}); give a larger "
                          "target or privacy.noise_multiplier") from None
    sigma_b = count_stddev(cfg)
    if adaptive(cfg) and z > 0 and 2 * sigma_b <= z:
        given = "privacy.clip_count_stddev" if p.clip_count_stddev > 0 else \
            "privacy.clip_count_stddev=0 (expected participants per round / 20)"
        raise ConfigError(f"privacy.adaptive_clip=true: the count's noise std sigma_b = {sigma_b:g} ({given}) must "
                          f"exceed half the noise multiplier z = {z:.6g}, or the updates' noise z_delta = "
                          "(z^-2 - (2 sigma_b)^-2)^-1/2 is not defined; set privacy.clip_count_stddev above "
                          f"{z / 2:.6g}, or lower z (privacy.noise_multiplier, or a larger privacy.target_epsilon)")


# ---------------------------------------------------------------- the math, pure


def seed_of(*words: int) -> int:
    """One 63-bit torch seed from several non-negative words (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def update_multiplier(z: float, sigma_b: float) -> float:
    """z_delta, the updates' noise multiplier that, with the count's noise std sigma_b, makes
    one round the Gaussian mechanism of multiplier z: z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2
    (Andrew et al. 2021, Thm 1: the bits centred to b - 1/2 have sensitivity 1/2). 0 for z = 0
    (clipping only); a ValueError when 2 sigma_b <= z (no z_delta reaches z)."""
    if z <= 0:
        return 0.0
    if 2 * sigma_b <= z:
        raise ValueError(f"2 sigma_b = {2 * sigma_b:g} must exceed z = {z:g}")
    return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


def count_noise(seed: int, round_: int) -> float:
    """N(0, 1) of the noisy count of adaptive clipping in one round."""
    return float(np.random.default_rng(seed_of(seed, round_, CLIP_SALT)).standard_normal())


def next_clip(clip: float, norms: list[float], quantile: float, lr: float, noise: float) -> tuple[float, float]:
    """Andrew et al.'s geometric rule: the noisy count of the norms within `clip` (plus
    `noise`, already scaled by sigma_b), its share b of the len(norms) participants, and
    C exp(-lr (b - quantile)): C grows when fewer than `quantile` of them are within it.
    Returns (next C, noisy count)."""
    count = sum(1 for norm in norms if norm <= clip) + noise
    return clip * math.exp(-lr * (count / len(norms) - quantile)), count


def clip_jointly(deltas: dict[Part, torch.Tensor], clip: float) -> tuple[dict[Part, torch.Tensor], float]:
    """The changes scaled by min(1, C / ||all of them||), and that norm (float64 sums).

    A change of norm 0 is left as it is (no 0 / 0). The scale is shrunk by 2^-20 (about
    1e-6, relative) below C / norm so that the float32 product's rounding (a relative
    error of about 6e-8 per coordinate, so of the norm) cannot take it above C."""
    norm = math.sqrt(sum(float(d.double().square().sum()) for d in deltas.values()))
    if norm <= clip:
        return dict(deltas), norm
    scale = clip / norm * (1.0 - 2.0 ** -20)
    return {p: d * scale for p, d in deltas.items()}, norm


def client_noise(seed: int, round_: int, client: int, part: Part, numel: int) -> torch.Tensor:
    """N(0, 1) [numel] float32 of one client's part in one round."""
    g = torch.Generator().manual_seed(seed_of(seed, round_, client, PARTS.index(part), CLIENT_SALT))
    return torch.randn(numel, generator=g, dtype=torch.float32)


class BlockNoise:
    """Server-side N(0, 1) for columns [a, b) of a part: one generator per NOISE_BLOCK-aligned
    column block, seeded by (seed, round, part, block), each block drawn whole and sliced,
    so a column's value is the same however the columns are cut into calls."""

    def __init__(self):
        self.cached: tuple[tuple, torch.Tensor] | None = None

    def block(self, seed: int, round_: int, part: Part, index: int) -> torch.Tensor:
        key = (seed, round_, part, index)
        if self.cached is None or self.cached[0] != key:
            g = torch.Generator().manual_seed(seed_of(seed, round_, PARTS.index(part), index, SERVER_SALT))
            self.cached = (key, torch.randn(NOISE_BLOCK, generator=g, dtype=torch.float32))
        return self.cached[1]

    def columns(self, seed: int, round_: int, part: Part, a: int, b: int) -> torch.Tensor:
        out = torch.empty(b - a, dtype=torch.float32)
        col = a
        while col < b:
            index, start = divmod(col, NOISE_BLOCK)
            take = min(NOISE_BLOCK - start, b - col)
            out[col - a:col - a + take] = self.block(seed, round_, part, index)[start:start + take]
            col += take
        return out


# ---------------------------------------------------------------- the client side


@register_transform("client_dp")
class ClientDP(Transform):
    """Clips each participant's change to C over all its parts; where=client also adds
    N(0, (z C)^2) per coordinate. Prepended to the chain by chain_for when
    privacy.where != none (never named in fl.transforms)."""

    needs_start = True

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.privacy
        if p.where == "none":
            raise ConfigError("the client_dp transform is applied by privacy.where=server or client; do not name it "
                              "in fl.transforms")
        self.clip = p.clip_norm
        self.std = noise_multiplier(cfg) * p.clip_norm if p.where == "client" else 0.0
        self.seed = cfg.run.seed

    def encode_update(self, update: ClientUpdate) -> None:
        if update.status is not Participation.PARTICIPATED:
            return  # zero rows that the server leaves out: nothing of the client's in them
        deltas = {p: update.delta(p).float() for p in PARTS}
        clipped, norm = clip_jointly(deltas, self.clip)
        log.debug("client %d, round %d: change of norm %.6g, clipped to %.6g", update.client, update.round, norm,
                  min(norm, self.clip))
        update.change_norm = norm
        for p in PARTS:
            change = clipped[p]
            if self.std > 0:
                noise = client_noise(self.seed, update.round, update.client, p, change.numel())
                change = change + self.std * noise.to(change.device)
            update.parts[p] = (update.start[p].float() + change).to(update.parts[p].dtype)


# ---------------------------------------------------------------- the server side


class ServerNoise:
    """privacy.where=server, mixed into an aggregator class (fedavg, fedprox, fedadam:
    config.SERVER_DP_STRATEGIES): the mean over the good participants with equal weights
    (the sum's sensitivity is then C, whatever the sample counts), plus N(0, (z C / n_good)^2)
    per coordinate, added before the strategy's own element-wise step (FedAdam's). With
    adaptive clipping z is z_delta and C the round's (share_clip sets dp_clip)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dp_z = update_noise_multiplier(cfg)
        self.dp_clip = cfg.privacy.clip_norm
        self.dp_seed = cfg.run.seed
        self.n_good = 0
        self.noise = BlockNoise()

    def plan(self, n, good, gram):
        self.n_good = int(good.sum())
        return super().plan(torch.ones_like(n), good, gram)

    @property
    def dp_std(self) -> float:
        return self.dp_z * self.dp_clip

    def finish(self, part: Part, rows: torch.Tensor, offset: int) -> None:
        # No good participant: all-NaN rows, nothing is released (everyone keeps its model).
        if self.dp_std > 0 and self.n_good > 0 and rows.numel() and bool(torch.isfinite(rows[0]).all()):
            noise = self.noise.columns(self.dp_seed, self.round, part, offset, offset + rows.shape[1])
            noisy = rows[0].float() + (self.dp_std / self.n_good) * noise.to(rows.device)
            rows.copy_(noisy.to(rows.dtype)[None, :].expand_as(rows))
        super().finish(part, rows, offset)


@functools.lru_cache(maxsize=None)
def with_server_noise(aggregator: type) -> type:
    """The aggregator class with ServerNoise mixed in (one class per aggregator)."""
    return type(f"ServerNoise{aggregator.__name__}", (ServerNoise, aggregator), {})
