"""fl.client_state=disk (fl/client_store.py): client states in per-rank files, read back bitwise."""

import os

import torch

from pilot_hpc.checkpoint import store
from pilot_hpc.fl.client import Status
from pilot_hpc.fl.client_store import DiskClientSlot, FileState, StateFiles
from pilot_hpc.train.spec import TrainResult


def initial():
    gen = torch.Generator().manual_seed(0)
    return {"lora.b": torch.randn(3, 2, generator=gen), "connector.w": torch.randn(4, generator=gen).bfloat16(),
            "lora.a": torch.randn(5, generator=gen, dtype=torch.float64)}


def equal(a, b):
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_a_state_goes_to_a_file_and_comes_back_bitwise_in_its_order(tmp_path):
    init = initial()
    files = StateFiles(str(tmp_path), 1, init)
    s = DiskClientSlot(4, "vqa", 0, train=[0] * 5, eval=[0], state=init, files=files)
    assert os.listdir(files.folder) == []  # the shared initial state needs no file
    assert equal(s.state, init)
    s.start()
    new = {k: v + 1 for k, v in init.items()}
    s.finish(TrainResult(steps=2, losses={"ce": 1.0}), new)
    assert sorted(os.listdir(files.folder)) == ["client_004.pre.safetensors", "client_004.state.safetensors"]
    assert equal(s.state, new) and equal(s.pre_state, init)
    assert s.state is not s.state  # read from the file on each access: no resident copy
    s.exclude()  # back to the round-start state
    assert equal(s.state, init)
    s.next_round()
    assert s.pre_state is None and s.status is Status.PENDING
    assert os.listdir(files.folder) == ["client_004.state.safetensors"]  # the round-start copy is gone
    assert equal(s.state, init)
    assert not any(n.endswith(".tmp") for n in os.listdir(files.folder))


def test_the_checkpoint_reads_the_files_one_tensor_at_a_time_and_gets_the_same_state(tmp_path):
    init = initial()
    files = StateFiles(str(tmp_path / "out"), 0, init)
    s = DiskClientSlot(0, "vqa", 0, train=[0] * 5, eval=[0], state=init, files=files)
    s.start()
    new = {k: v * 3 for k, v in init.items()}
    s.finish(TrainResult(steps=1), new)
    rec = s.record(complete=True)
    assert isinstance(rec.state, FileState) and equal(dict(rec.state), new)
    path = str(tmp_path / "ck.h5")
    from pilot_hpc.config import load_config

    cfg = load_config(None, [])
    store.create(path, cfg, 1, complete=True, history=[], server={})
    store.append_clients(path, {0: rec})
    store.finalize(path, path + ".final")
    got = store.read(path + ".final").clients[0].state
    assert all(torch.equal(got[k], new[k]) and got[k].dtype == new[k].dtype for k in new)


def test_a_new_run_does_not_read_an_earlier_runs_files(tmp_path):
    init = initial()
    files = StateFiles(str(tmp_path), 0, init)
    files.put(2, "state", {k: v + 7 for k, v in init.items()})
    again = StateFiles(str(tmp_path), 0, init)
    assert equal(again.get(2, "state"), init)


def test_a_hosted_client_keeps_its_decoded_images_only_while_hosted(tmp_path):
    from pilot_hpc.fl.client import hosting

    class Data(list):
        """A dataset with a decoded-image cache, as InstructionDataset (data.cache_images)."""

        def __init__(self, n):
            super().__init__(range(n))
            self.cache = {i: torch.zeros(2) for i in range(n)}  # the load-time check decoded them

        def drop_cached_images(self):
            self.cache.clear()

    class Model:
        def set_task(self, t):
            pass

        def set_state(self, state):
            pass

    init = initial()
    train, evals = Data(5), Data(2)
    s = DiskClientSlot(0, "vqa", 0, train=train, eval=evals, state=init, files=StateFiles(str(tmp_path), 0, init))
    assert train.cache == {} and evals.cache == {}  # emptied once loaded
    with hosting(Model(), s):
        train.cache[0] = torch.ones(2)  # training decodes an image again
        assert train.cache
    assert train.cache == {}
