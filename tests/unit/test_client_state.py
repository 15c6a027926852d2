"""The client's round state machine, and checkpoint save/locate driven without a Federation."""

from __future__ import annotations

import pytest
import torch

from pilot_hpc.checkpoint import resume, store
from pilot_hpc.config import load_config
from pilot_hpc.fl.client import ClientSlot, Status, TransitionError, hosted_client, hosting
from pilot_hpc.train.spec import TrainProgress, TrainResult


def slot(k: int = 0) -> ClientSlot:
    return ClientSlot(k, "vqa", 0, train=[0] * 5, eval=[0] * 2, state={"lora.w": torch.zeros(2)})


def progress(step: int) -> TrainProgress:
    return TrainProgress(step=step, samples=8 * step, sums={"ce": 1.5}, optimizer={"0.step": torch.tensor(2.0)},
                         torch_rng=torch.get_rng_state())


def test_a_round_start_interrupt_continue_finish_next():
    s = slot()
    assert s.start() is None and s.pre_state is s.state
    start = s.state
    s.interrupt(progress(3), {"lora.w": torch.ones(2)})
    assert s.status is Status.PARTIAL and s.progress.step == 3 and torch.equal(s.state["lora.w"], torch.ones(2))
    assert s.start().step == 3 and s.pre_state is start  # continuing keeps the round-start state
    s.finish(TrainResult(steps=5, losses={"ce": 0.5}), {"lora.w": torch.full((2,), 2.0)})
    assert s.status is Status.DONE and s.progress is None and (s.steps, s.losses) == (5, {"ce": 0.5})
    s.next_round()
    assert (s.status, s.pre_state, s.progress, s.finite) == (Status.PENDING, None, None, True)


def test_an_interrupt_at_step_0_keeps_the_round_start_state():
    s = slot()
    s.start()
    s.interrupt(TrainProgress.restart(torch.get_rng_state()), {"lora.w": torch.ones(2)})
    assert s.state is s.pre_state and s.status is Status.PARTIAL


def test_exclude_goes_back_to_the_round_start():
    s = slot()
    s.start()
    s.finish(TrainResult(steps=1), {"lora.w": torch.full((2,), float("nan"))})
    s.exclude()
    assert not s.finite and torch.equal(s.state["lora.w"], torch.zeros(2))


def test_adopting_an_excluded_round_adopts_its_exclusion():
    """centralized: the other clients take the one trained model's round, so a non-finite one
    leaves every client without a finite update (and the round's stop vote sees that)."""
    trained, other = slot(0), slot(1)
    trained.start()
    trained.finish(TrainResult(steps=1), {"lora.w": torch.full((2,), float("nan"))})
    trained.exclude()
    other.adopt(trained)
    assert other.status is Status.DONE and not other.finite and torch.equal(other.state["lora.w"], torch.zeros(2))


def test_transitions_that_the_round_does_not_allow():
    s = slot()
    with pytest.raises(TransitionError, match="exclude"):
        s.exclude()  # nothing trained yet
    s.start()
    s.finish(TrainResult(steps=1), s.state)
    for call in (s.start, lambda: s.finish(TrainResult(), s.state), lambda: s.interrupt(progress(1), s.state)):
        with pytest.raises(TransitionError, match="client 0"):
            call()


def test_status_codes_round_trip():
    assert [Status.from_code(s.code) for s in Status] == list(Status)


def test_hosting_names_the_client_until_a_normal_exit():
    class FakeModel:
        task = loaded = None

        def set_task(self, task):
            self.task = task

        def set_state(self, state):
            self.loaded = state

    pm, s = FakeModel(), slot(4)
    with hosting(pm, s):
        assert hosted_client() == 4 and pm.loaded is s.state and pm.task == 0
    assert hosted_client() is None
    with pytest.raises(RuntimeError):
        with hosting(pm, s):
            raise RuntimeError("boom")
    assert hosted_client() == 4  # the abort message can still name it


class OneRank:
    """What save/locate need of a communicator, for one process."""

    rank, size = 0, 1

    def barrier(self):
        pass

    def bcast(self, array, tag=""):
        return array

    def all_ok(self, ok: bool) -> bool:
        return ok


def test_save_and_locate_without_a_federation(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "fl.num_clients=2", "fl.client_tasks=[vqa, caption]",
                             "pilot.top_m=1", "fl.task_metrics={vqa: vqa_accuracy, caption: cider}"])
    slots = [slot(0), slot(1)]
    slots[1].start()
    slots[1].interrupt(progress(2), {"lora.w": torch.ones(2)})
    path = resume.save(OneRank(), cfg, 1, complete=False, history=[{"round": 0, "clients": []}], server={},
                       clients={s.k: s.record(complete=False) for s in slots})
    assert path.endswith("round_001.preempt.h5")
    start = resume.locate(OneRank(), cfg, {"lora.w": (2,)}, [0, 1])
    assert (start.round, start.complete, start.history) == (1, False, [{"round": 0, "clients": []}])
    back = [slot(0), slot(1)]
    for s in back:
        s.restore(start.clients[s.k], start.complete)
    assert back[0].status is Status.PENDING and back[1].status is Status.PARTIAL
    assert back[1].progress.step == 2 and torch.equal(back[1].state["lora.w"], torch.ones(2))
    assert torch.equal(back[1].pre_state["lora.w"], torch.zeros(2))


def test_a_checkpoint_from_before_a_new_config_key_resumes_at_its_default(tmp_path, monkeypatch):
    """A checkpoint whose config lacks fedadam.weighting (a key it was written without) resumes
    when the key is at its default, and is refused naming it otherwise."""
    import dataclasses

    from pilot_hpc.config import Config, ConfigError

    args = [f"run.output_dir={tmp_path}", "fl.num_clients=2", "fl.client_tasks=[vqa, caption]", "pilot.top_m=1",
            "fl.task_metrics={vqa: vqa_accuracy, caption: cider}", "fl.strategy=fedadam"]
    cfg = load_config(None, args)

    def older(self):
        d = dataclasses.asdict(self)
        del d["fedadam"]["weighting"]
        return d

    with monkeypatch.context() as m:
        m.setattr(Config, "to_dict", older)
        old_hash = cfg.result_hash()
        resume.save(OneRank(), cfg, 1, complete=True, history=[], server={},
                    clients={s.k: s.record(complete=True) for s in (slot(0), slot(1))})
    assert old_hash == cfg.result_hash()  # config.UNHASHED_AT_DEFAULT
    start = resume.locate(OneRank(), cfg, {"lora.w": (2,)}, [0, 1])
    assert (start.round, start.complete) == (1, True)
    with pytest.raises(ConfigError, match="fedadam.weighting: 'samples' -> 'uniform'"):
        resume.locate(OneRank(), load_config(None, args + ["fedadam.weighting=uniform"]), {"lora.w": (2,)}, [0, 1])


def test_an_older_checkpoint_format_is_refused_with_the_reason(tmp_path):
    import h5py

    path = str(tmp_path / "round_001.h5")
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pilot_hpc-checkpoint-2"
    with pytest.raises(store.CheckpointError, match="older pilot_hpc"):
        store.read(path)
