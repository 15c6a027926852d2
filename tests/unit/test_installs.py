"""Lazy installs (fl/installs.py) on hand-computable rows, the slot's change tracking, and
the checkpoint's /installs group and copied client groups (checkpoint/store.py)."""

import math
import os

import torch

from helpers import SMOKE
from pilot_hpc import checkpoint
from pilot_hpc.checkpoint import ClientCheckpoint
from pilot_hpc.config import load_config
from pilot_hpc.fl.client import ClientSlot
from pilot_hpc.fl.installs import PendingRows, catch_up, stage_entry

NAN = float("nan")


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


class OverwritePolicy:
    """Installs like FedAvg/Pilot (each finite row overwrites its slot of the 'model', a
    NaN row keeps it) and logs sat_out; stage 1 in round 1, 2 after (as Pilot)."""

    def __init__(self):
        self.calls = []

    def install(self, pm, shared, personal):
        for t in range(shared.shape[0]):
            if torch.isfinite(shared[t]).all():
                pm["rows"][t] = shared[t].clone()
        if personal is not None and torch.isfinite(personal).all():
            pm["personal"] = personal.clone()

    def sat_out(self, pm, round_):
        self.calls.append(round_)

    def stage(self, round_):
        return 1 if round_ == 1 else 2


def eager(policy, pm, answers):
    for r, (shared, personal) in answers:
        policy.install(pm, shared, personal)
        policy.sat_out(pm, r)


def test_the_latest_finite_row_of_each_task_with_its_round():
    p = PendingRows()
    p.record(1, rows([1.0, 1.0], [2.0, 2.0], [3.0, 3.0]), None)
    p.record(2, rows([NAN, NAN], [5.0, 5.0], [NAN, NAN]), rows(9.0, 9.0))
    p.record(3, rows([NAN, NAN], [NAN, NAN], [7.0, 7.0]), rows(NAN, NAN))
    assert p.round == 3 and {t: r for t, (r, _) in p.rows.items()} == {0: 1, 1: 2, 2: 3}
    shared, personal = p.since(1)  # holds round 1: task 0 has nothing newer, NaN there
    assert math.isnan(shared[0, 0]) and shared[1].tolist() == [5.0, 5.0] and shared[2].tolist() == [7.0, 7.0]
    assert personal.tolist() == [9.0, 9.0]  # the NaN personal row of round 3 keeps round 2's
    shared, personal = p.since(2)
    assert torch.isnan(shared[:2]).all() and shared[2].tolist() == [7.0, 7.0] and personal is None
    assert torch.isnan(p.since(3)[0]).all()


def test_one_catch_up_equals_every_round_installed_in_turn():
    answers = [(1, (rows([1.0], [2.0]), rows(0.5))), (2, (rows([NAN], [4.0]), None)),
               (3, (rows([6.0], [NAN]), rows(NAN))), (4, (rows([NAN], [NAN]), None))]
    p = PendingRows()
    for r, (shared, personal) in answers:
        p.record(r, shared, personal)
    start = {"rows": [torch.zeros(1), torch.zeros(1)], "personal": torch.zeros(1)}
    for held in range(0, 5):  # a client that holds the answers up to round `held`
        ref = {"rows": list(start["rows"]), "personal": start["personal"]}
        want = OverwritePolicy()
        eager(want, ref, answers[held:])
        got = {"rows": list(start["rows"]), "personal": start["personal"]}
        lazy = OverwritePolicy()
        assert catch_up(lazy, got, p, held) == (held < 4)
        assert [t.tolist() for t in got["rows"]] == [t.tolist() for t in ref["rows"]], held
        assert got["personal"].tolist() == ref["personal"].tolist()
        # sat_out once, of the newest round (it depends only on the stage, idempotent in one)
        assert lazy.calls == ([4] if held < 4 else [])


class EntryPolicy(OverwritePolicy):
    """sat_out of a stage entry copies row 0 into 'cross' once (as Pilot's stage 2 starts
    its cross-task adapters from the own task adapter just installed)."""

    def sat_out(self, pm, round_):
        super().sat_out(pm, round_)
        if self.stage(round_) == 2 and "cross" not in pm:
            pm["cross"] = pm["rows"][0].clone()


def test_a_stage_entry_is_installed_on_its_own_before_the_later_rounds():
    answers = [(1, (rows([1.0], [2.0]), None)), (2, (rows([3.0], [NAN]), None)),
               (3, (rows([5.0], [6.0]), None)), (4, (rows([NAN], [8.0]), None))]
    p = PendingRows()
    for r, (shared, personal) in answers:
        p.record(r, shared, personal, mark=stage_entry(EntryPolicy(), r))
    assert sorted(p.marks) == [2]
    for held in range(0, 4):
        start = {"rows": [torch.zeros(1), torch.zeros(1)]}
        if held >= 2:
            start["cross"] = torch.full((1,), 7.0)
        ref = {"rows": list(start["rows"]), **({"cross": start["cross"]} if "cross" in start else {})}
        eager(EntryPolicy(), ref, answers[held:])
        got = {"rows": list(start["rows"]), **({"cross": start["cross"]} if "cross" in start else {})}
        lazy = EntryPolicy()
        catch_up(lazy, got, p, held)
        assert got["cross"].tolist() == ref["cross"].tolist() == ([3.0] if held < 2 else [7.0]), held
        assert [t.tolist() for t in got["rows"]] == [t.tolist() for t in ref["rows"]]
        assert got["rows"][1].tolist() == [8.0] and got["rows"][0].tolist() == ([5.0] if held < 3 else [0.0])
        assert lazy.calls == ([2, 4] if held < 2 else [4])


def test_stage_entries_are_the_rounds_a_stage_starts_after_round_one():
    policy = OverwritePolicy()
    assert [r for r in range(1, 6) if stage_entry(policy, r)] == [2]


def test_the_table_survives_its_record():
    p = PendingRows()
    p.record(2, rows([1.0], [NAN]), rows(3.0))
    q = PendingRows.from_record(p.to_record())
    assert q.round == 2 and q.shape == (2, 1) and q.rows[0][0] == 2 and q.personal[0] == 2
    assert torch.equal(q.since(0)[0][0], p.since(0)[0][0]) and torch.equal(q.since(0)[1], rows(3.0))


def test_a_slot_is_changed_only_by_what_its_checkpoint_records():
    slot = ClientSlot(0, "vqa", 0, train=[1, 2], eval=None, state={"a": torch.zeros(1)})
    assert slot.changed  # never written yet
    slot.changed = False
    slot.next_round()  # a client that sat the round out: status, flags as they were
    slot.took_part, slot.error, slot.trace = None, None, None
    assert not slot.changed
    slot.installed = 0  # the same round
    assert not slot.changed
    slot.installed = 3
    assert slot.changed
    slot.changed = False
    slot.state = slot.state  # any state assigned counts (comparing would cost a write)
    assert slot.changed


def _write(folder, round_, clients, installs=None, linked=(), link_to=None):
    cfg = load_config(SMOKE)
    final = os.path.join(folder, checkpoint.file_name(round_, True))
    checkpoint.create(final + ".tmp", cfg, round_, complete=True, history=[], server={}, installs=installs)
    checkpoint.append_clients(final + ".tmp", clients, linked, link_to, seal=installs is not None)
    checkpoint.finalize(final + ".tmp", final)
    return final


def _records():
    torch.manual_seed(0)
    states = [{"lora.a": torch.randn(3, 2), "lora.b": torch.randn(2).to(torch.bfloat16)} for _ in range(2)]
    return states, {k: ClientCheckpoint(task="vqa", num_samples=5, state=states[k], installed=k,
                                        losses={"ce": 0.25}) for k in (0, 1)}


def test_installs_and_linked_clients_read_back_exactly(tmp_path, monkeypatch):
    import h5py

    states, recs = _records()
    p = PendingRows()
    p.record(2, rows([1.5, 2.5], [NAN, NAN]), None, mark=True)
    first = _write(str(tmp_path), 2, recs, installs=p.to_record())
    p.record(3, rows([NAN, NAN], [4.0, 4.0]), rows(1.0, 2.0))
    # Round 3: client 1 unchanged (linked to round 2), client 0 written again; round 4
    # links client 1 to round 2 as well (one hop), not to round 3.
    second = _write(str(tmp_path), 3, {0: recs[0]}, installs=p.to_record(), linked=[1], link_to=first)
    third = _write(str(tmp_path), 4, {0: recs[0]}, installs=p.to_record(), linked=[1], link_to=second)
    with h5py.File(third, "r") as f:
        assert f["clients"].get("client_01", getlink=True).filename == os.path.basename(first)
    monkeypatch.chdir("/")  # links resolve next to the file, whatever the working folder
    for path in (second, third):
        ck = checkpoint.read(path)  # the whole file: root digest, then every client's (through links)
        assert sorted(ck.clients) == [0, 1] and ck.clients[1].installed == 1 and ck.clients[1].losses == {"ce": 0.25}
        for k in (0, 1):
            for key, t in states[k].items():
                assert torch.equal(ck.clients[k].state[key].view(torch.uint8), t.view(torch.uint8))
    q = PendingRows.from_record(checkpoint.read(second).installs)
    assert q.round == 3 and {t: r for t, (r, _) in q.rows.items()} == {0: 2, 1: 3} and q.personal[0] == 3
    assert torch.equal(q.rows[0][1], rows(1.5, 2.5)) and torch.equal(q.personal[1], rows(1.0, 2.0))
    assert list(q.marks) == [2] and list(q.marks[2][0]) == [0] and q.marks[2][1] is None
    assert torch.equal(q.since(0, at=2)[0][0], rows(1.5, 2.5)) and torch.isnan(q.since(0, at=2)[0][1]).all()
    # A file without lazy installs has neither the group, nor the attribute, nor sealed clients.
    plain = _write(str(tmp_path / "plain"), 4, {0: ClientCheckpoint("vqa", 5, states[0])}) if os.makedirs(
        str(tmp_path / "plain")) is None else None
    assert checkpoint.read(plain).installs is None and checkpoint.read(plain).clients[0].installed is None
    with h5py.File(plain, "r") as f:
        assert "client_digests" not in f.attrs


def test_a_linked_record_damaged_or_gone_makes_the_file_unusable(tmp_path):
    import h5py
    import pytest

    from pilot_hpc.checkpoint import CheckpointError

    _, recs = _records()
    table = PendingRows().to_record()
    first = _write(str(tmp_path), 1, recs, installs=table)
    second = _write(str(tmp_path), 2, {0: recs[0]}, installs=table, linked=[1], link_to=first)
    with h5py.File(first, "r") as f:
        offset = f["clients/client_01/state/lora.a"].id.get_chunk_info(0).byte_offset
    with open(first, "r+b") as fh:  # one flipped byte of client 1's stored tensor, in round 1's file
        fh.seek(offset + 9)
        byte = fh.read(1)
        fh.seek(offset + 9)
        fh.write(bytes([byte[0] ^ 0xFF]))
    for path in (first, second):
        with pytest.raises(CheckpointError, match="corrupt"):
            checkpoint.read(path)
    os.remove(first)
    with pytest.raises(CheckpointError, match="missing or unreadable"):
        checkpoint.read(second)
