"""Transforms of an update on its way: `encode` on the client before it leaves, `decode`
on the server before mixing.

The place for clipping, noise, masks and quantisation. Each transform is a small object
built from the config; the chain runs the registered ones named in `fl.transforms`, in
order, and then the wire dtype (`fl.wire_dtype`, or `fl.codec`), which is always last on
the client (first on the server); a lossy codec replaces it with `Codec`. `encode_update` sees one client's whole update (all parts: a joint
norm, for example) and by default calls `encode` on each part in PARTS order; a
transform with `needs_start = True` finds the round-start rows in `update.start` (so it
can work on the change, `update.delta(part)`). `decode`
one column chunk of one part of every sending client ([K_sending, c]) and must give it
back in the same shape and dtype (the mix writes its result into that buffer).

Adding one: subclass Transform, `register_transform("name")`, and name it in
`fl.transforms` (or name a class outside pilot_hpc as `module:Class`); its settings go in
a config section of its own. ATA's two passes over the personal part (the Gram matrix,
then the mix) decode each of its chunks once per pass.
"""

from __future__ import annotations

import importlib

import torch

from pilot_hpc.config import ConfigError
from pilot_hpc.fl import codecs
from pilot_hpc.fl.update import PARTS, ClientUpdate, Form, Part, Participation

TRANSFORMS: dict[str, type["Transform"]] = {}


def register_transform(name: str):
    def wrap(cls):
        cls.name = name
        TRANSFORMS[name] = cls
        return cls
    return wrap


class Transform:
    name = "identity"
    # True: encode needs the round-start rows of each part (update.start).
    needs_start = False

    def __init__(self, cfg):
        self.cfg = cfg

    def encode_update(self, update: ClientUpdate) -> None:
        """Client side, in place: the whole update (every part) -> what travels."""
        for part in PARTS:
            update.parts[part] = self.encode(part, update.parts[part], update)

    def encode(self, part: Part, row: torch.Tensor, update: ClientUpdate) -> torch.Tensor:
        """Client side: one part's row of `update` -> what travels."""
        return row

    def decode(self, part: Part, block: torch.Tensor, cols: tuple[int, int]) -> torch.Tensor:
        """Server side: columns cols[0]..cols[1] of `part` of every sending client."""
        return block


class WireDtype(Transform):
    """fl.wire_dtype: the rows travel in this dtype (config.py says why float32 is the
    default). The server mixes in float32 whatever the wire dtype, so decode has nothing
    to undo."""

    name = "wire_dtype"
    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dtype = self.DTYPES[cfg.fl.codecs()[0]]  # fl.codec=bfloat16 is fl.wire_dtype=bfloat16

    def encode(self, part, row, update):
        return row.to(self.dtype)


class Codec(Transform):
    """A codec that is lossy on integers or differs between the two directions
    (fl.codec, fl.codec_down; fl/codecs.py): the update travels as the change from the
    round's start plus the client's error-feedback residual, encoded to bytes. Each part
    becomes a uint8 row; `update.residual` (the client's, by part name) is updated. The
    server's exchange (fl/coded.py) decodes the bytes to float32 before the chain's
    decode, so decode has nothing to undo. A client that sends zeros (excluded, dropped)
    encodes its zero row and keeps its residual."""

    name = "codec"
    needs_start = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.up, self.down = cfg.fl.codecs()

    def encode_update(self, update: ClientUpdate) -> None:
        residual = dict(update.residual or {})
        for part in PARTS:
            where = f"client {update.client}'s {part.value} part in round {update.round}"
            if update.status is Participation.PARTICIPATED:
                raw, _, left = codecs.apply_error_feedback(update.delta(part), residual.get(part.value), self.up, where)
                residual[part.value] = left.cpu()  # a checkpoint's tensor, kept beside the client's state
            else:
                raw = codecs.encode_rows(update.parts[part].float(), self.up, where)
            update.parts[part] = raw
        update.form = Form.DELTA
        update.residual = residual or update.residual


def coded(cfg) -> bool:
    """Whether the run's codecs need the encoded exchange (fl/coded.py); otherwise the rows
    travel as today, in the wire dtype both ways (WireDtype)."""
    return cfg.fl.sends_changes()


class Chain:
    """The transforms of a run, applied part by part: encode in order, decode in reverse."""

    def __init__(self, transforms: list[Transform]):
        self.transforms = transforms

    @property
    def wire_dtype(self) -> torch.dtype:
        last = self.transforms[-1] if self.transforms else None
        return last.dtype if isinstance(last, WireDtype) else torch.float32

    @property
    def codec(self) -> Codec | None:
        """The encoded exchange's codec (the last transform), None on the plain path."""
        last = self.transforms[-1] if self.transforms else None
        return last if isinstance(last, Codec) else None

    @property
    def needs_start(self) -> bool:
        return any(t.needs_start for t in self.transforms)

    def encode(self, update: ClientUpdate) -> ClientUpdate:
        for t in self.transforms:
            t.encode_update(update)
        update.start = None  # not needed past the encoders: the rows' memory, not twice
        return update

    def decode(self, part: Part, block: torch.Tensor, cols: tuple[int, int]) -> torch.Tensor:
        for t in reversed(self.transforms):
            out = t.decode(part, block, cols)
            if out.shape != block.shape or out.dtype != block.dtype:
                raise RuntimeError(f"transform {t.name!r}: decode changed a [{tuple(block.shape)}] {block.dtype} "
                                   f"block to [{tuple(out.shape)}] {out.dtype}; it must keep both")
            block = out
        return block


def resolve(name: str) -> type[Transform]:
    """A registered name, or `module:Class` for a transform defined outside pilot_hpc (its
    module importable on every rank)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"fl.transforms: cannot load {name!r} ({type(err).__name__}: {err}); give "
                              "module:Class with the module on PYTHONPATH") from None
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise ConfigError(f"fl.transforms: {name!r} is not a subclass of pilot_hpc.fl.transforms.Transform")
        return cls
    if name not in TRANSFORMS:
        raise ConfigError(f"fl.transforms: unknown transform {name!r}; registered: {sorted(TRANSFORMS)}, "
                          "or module:Class")
    return TRANSFORMS[name]


def chain_for(cfg) -> Chain:
    """fl.transforms, then the wire dtype; with privacy.where != none the clipping (and
    noise) of pilot_hpc.fl.privacy comes first, so every later transform sees the change
    it bounds. That module registers it (it imports this one, so this one cannot import it)."""
    first = []
    if cfg.privacy.where != "none":
        if "client_dp" in cfg.fl.transforms:
            raise ConfigError("fl.transforms: client_dp is applied by privacy.where itself; remove it from the list")
        if "client_dp" not in TRANSFORMS:
            raise RuntimeError("privacy.where needs the client_dp transform, which pilot_hpc.fl.privacy registers: "
                               "import that module first (the federation and main's checks do)")
        first = [TRANSFORMS["client_dp"](cfg)]
    return Chain(first + [resolve(n)(cfg) for n in cfg.fl.transforms] + [Codec(cfg) if coded(cfg) else WireDtype(cfg)])
