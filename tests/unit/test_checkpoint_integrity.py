"""Whole-file checkpoint integrity: a seeded fuzz of single 4-byte flips over a
real checkpoint file, fed to the function resume uses to choose a file (resume._choose,
through resume.verify). Every flip must end as "rejected with a warning and fallen back
to the previous file" or "no effect" (the file loads to exactly the original content);
never a crash, never a silently different value."""

import logging
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from helpers import SMOKE
from pilot_hpc import checkpoint
from pilot_hpc.checkpoint import ClientCheckpoint, Status, resume, store
from pilot_hpc.config import load_config
from pilot_hpc.train.spec import TrainProgress

HISTORY = [{"round": 0, "clients": [{"client": 0, "task": "vqa", "score": 41.25}]},
           {"round": 1, "clients": [{"client": 1, "task": "caption", "score": 11.29}]}]


def states():
    torch.manual_seed(0)
    return [{"connector.router.weight": torch.randn(3, 5), "lora.gate_proj.lora_B": torch.randn(8, 4),
             "lora.a": torch.randn(4, 2).to(torch.bfloat16), "scalar": torch.tensor(2.5)} for _ in range(2)]


def write(cfg, folder, round_, st):
    final = os.path.join(folder, checkpoint.file_name(round_, True))
    tmp = final + ".tmp"
    checkpoint.create(tmp, cfg, round_, complete=True, history=HISTORY[:round_ + 1], server={"m": torch.ones(3)})
    checkpoint.append_clients(tmp, {0: ClientCheckpoint("vqa", 12, st[0], losses={"ce": 0.5}, steps=3)})
    progress = TrainProgress(step=2, samples=16, sums={"ce": 1.25}, torch_rng=torch.get_rng_state()[:64],
                             optimizer={"0.exp_avg": torch.randn(3, 5), "0.step": torch.tensor(2.0)})
    checkpoint.append_clients(tmp, {1: ClientCheckpoint("caption", 7, st[1], status=Status.PARTIAL, pre_state=st[0],
                                                        progress=progress, losses={"ce": 0.75})})
    checkpoint.finalize(tmp, final)
    return final


def expected_shapes(st):
    return {k: tuple(v.shape) for k, v in st[0].items()}


def same(a: store.Checkpoint, b: store.Checkpoint) -> bool:
    """Exactly equal content: attributes, history, server, every client field and tensor."""
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            # bytewise: NaN payloads and -0.0 count too
            return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                             y.reshape(-1).view(torch.uint8))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, TrainProgress):
            return all(eq(getattr(x, f), getattr(y, f)) for f in ("step", "samples", "sums", "torch_rng", "optimizer"))
        if isinstance(x, ClientCheckpoint):
            return all(eq(getattr(x, f), getattr(y, f)) for f in vars(x))
        return type(x) is type(y) and x == y
    return (eq(a.attrs, b.attrs) and a.history == b.history and eq(a.server, b.server)
            and eq(a.clients, b.clients) and a.round == b.round and a.complete == b.complete)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    cfg = load_config(SMOKE, [f"run.output_dir={folder}"])
    st = states()
    os.makedirs(resume.folder_of(cfg))
    good1 = write(cfg, resume.folder_of(cfg), 1, st)
    good2 = write(cfg, resume.folder_of(cfg), 2, st)
    return cfg, st, good1, good2, open(good2, "rb").read()


def offsets(raw: bytes, path: str, rng: np.random.Generator) -> tuple[list[int], set[int]]:
    """~300 offsets: the superblock and root header, the attributes' text (history,
    config, losses, digest), the tensor chunks, and uniform draws over the whole file;
    and the subset that lies wholly inside content (attribute text, chunk bytes), where
    a flip must be rejected."""
    size = len(raw)
    chosen = list(rng.integers(0, min(size, 1024) - 4, 60))  # superblock, root object header
    inside = set()
    for needle in (b'"score": 11.29', b'"ce": 0.75', b"lr_stage1", b"sha256:", b"caption", b"pilot_hpc-checkpoint"):
        at = raw.find(needle)
        assert at >= 0, needle
        chosen += [at + int(d) for d in rng.integers(-8, len(needle) + 8, 6)]
        inside |= {at + int(d) for d in rng.integers(0, len(needle) - 3, 3)}
    with h5py.File(path, "r") as f:
        chunks = []
        f.visititems(lambda name, obj: chunks.append(obj.id.get_chunk_info(0)) if isinstance(obj, h5py.Dataset)
                     and obj.chunks else None)
    assert len(chunks) >= 10
    for c in chunks:
        inside |= {c.byte_offset + int(d) for d in rng.integers(0, c.size - 3, 3)}
    chosen += list(rng.integers(0, size - 4, 150))
    return sorted({int(o) for o in chosen if 0 <= o <= size - 4} | inside), inside


def test_four_byte_flips_are_rejected_and_fall_back_or_change_nothing(world, caplog):
    cfg, st, good1, good2, raw = world
    original = resume.verify(good2, 2, expected_shapes(st))
    rng = np.random.default_rng(16)
    cases, inside = offsets(raw, good2, rng)
    assert len(cases) >= 250
    outcomes = {"rejected": 0, "no effect": 0}
    for off in cases:
        flipped = bytearray(raw)
        for i, x in enumerate(rng.integers(1, 256, 4)):  # nonzero: every byte changes
            flipped[off + i] ^= int(x)
        with open(good2, "wb") as fh:
            fh.write(bytes(flipped))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pilot_hpc.resume"):
            choice = resume._choose(cfg, 2, expected_shapes(st))  # must not raise, whatever the flip
        if choice == (2, 1):  # accepted: then it must be exactly the original content
            assert off not in inside, f"offset {off}: a flip inside stored content was accepted"
            assert same(store.read(good2), original), f"offset {off}: accepted with different content"
            outcomes["no effect"] += 1
        else:
            assert choice == (1, 1), f"offset {off}: chose {choice} instead of falling back to round 1"
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("skipping" in m and "round_002.h5" in m for m in warned), (off, warned)
            outcomes["rejected"] += 1
    with open(good2, "wb") as fh:
        fh.write(raw)
    # Both outcomes occur: the file has unused bytes (HDF5's free and reserved space) where
    # a flip changes nothing, and the flips inside content were all rejected above.
    assert outcomes["rejected"] >= len(inside) and outcomes["no effect"] > 0, outcomes


def test_a_changed_attribute_value_is_caught_by_the_digest(world, tmp_path):
    """The issue's case: digits changed in `history` (h5py rewrites the attribute
    consistently, so only the digest can tell)."""
    cfg, st, good1, good2, raw = world
    bad = tmp_path / "round_002.h5"
    shutil.copy(good2, bad)
    with h5py.File(bad, "a") as f:
        f.attrs["history"] = f.attrs["history"].replace("11.29", "99.29")
    with pytest.raises(checkpoint.CheckpointError, match="content digest mismatch"):
        checkpoint.read(str(bad))
    # One client's tensor rewritten with zeros (chunk checksums recomputed by HDF5).
    shutil.copy(good2, bad)
    with h5py.File(bad, "a") as f:
        ds = f["clients/client_00/state/lora.gate_proj.lora_B"]
        ds[...] = 0
    with pytest.raises(checkpoint.CheckpointError, match="content digest mismatch"):
        resume.verify(str(bad), 2, expected_shapes(st))


def test_no_usable_file_starts_over_saying_so(world, tmp_path, caplog):
    cfg, st, good1, good2, raw = world
    out = tmp_path / "out"
    cfg2 = load_config(SMOKE, [f"run.output_dir={out}"])
    os.makedirs(resume.folder_of(cfg2))
    with open(os.path.join(resume.folder_of(cfg2), "round_001.h5"), "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING, logger="pilot_hpc.resume"):
        assert resume._choose(cfg2, 2, expected_shapes(st)) == (-1, 0)
    assert any("starting over from round 0" in r.getMessage() for r in caplog.records)


def test_a_file_without_digest_is_refused(world, tmp_path):
    cfg, st, good1, good2, raw = world
    bad = tmp_path / "round_002.h5"
    shutil.copy(good2, bad)
    with h5py.File(bad, "a") as f:
        del f.attrs[store.DIGEST_ATTR]
    with pytest.raises(checkpoint.CheckpointError, match="missing attribute 'digest'"):
        checkpoint.read(str(bad))
