"""The typed update and its transform chain."""

import pytest
import torch

from helpers import task_world
from pilot_hpc.config import ConfigError
from pilot_hpc.fl.transforms import Chain, Transform, WireDtype, chain_for
from pilot_hpc.fl.update import ClientUpdate, Form, Part, Participation


def update(**kw):
    parts = {Part.SHARED_BY_TASK: torch.arange(3.0), Part.PERSONAL: torch.arange(3.0, 5.0)}
    return ClientUpdate(client=1, parts=parts, num_samples=7, status=Participation.PARTICIPATED, **kw)


def test_the_row_is_the_parts_in_wire_order_and_statuses_say_who_sends():
    u = update()
    assert u.widths() == (3, 2) and u.row().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and u.form is Form.PARAMS
    # A dropped client (fl.on_client_error=exclude) holds its row too, as zeros.
    assert [s for s in Participation if s.sends] == [Participation.PARTICIPATED, Participation.EXCLUDED_NONFINITE,
                                                    Participation.DROPPED]
    for s in Participation:
        assert Participation.from_code(s.code) is s


class Add(Transform):
    def __init__(self, cfg, value):
        super().__init__(cfg)
        self.value = value

    def encode(self, part, row, update):
        return row * 10 + self.value

    def decode(self, part, block, cols):
        return (block - self.value) / 10


def test_encode_runs_in_order_and_decode_in_reverse():
    cfg = task_world([0, 1, 2])
    chain = Chain([Add(cfg, 1.0), Add(cfg, 2.0), WireDtype(cfg)])
    u = chain.encode(update())
    # ((x * 10 + 1) * 10 + 2): the first transform is applied first
    assert u.parts[Part.PERSONAL].tolist() == [312.0, 412.0]
    back = chain.decode(Part.PERSONAL, u.parts[Part.PERSONAL][None, :].clone(), (0, 2))
    torch.testing.assert_close(back, torch.tensor([[3.0, 4.0]]))


def test_the_wire_dtype_is_the_last_encode_and_a_decode_may_not_change_the_buffer():
    chain = chain_for(task_world([0, 1, 2], "fl.wire_dtype=bfloat16"))
    assert chain.wire_dtype == torch.bfloat16
    assert chain.encode(update()).parts[Part.SHARED_BY_TASK].dtype == torch.bfloat16

    class Upcast(Transform):
        def decode(self, part, block, cols):
            return block.double()

    with pytest.raises(RuntimeError, match="decode changed"):
        Chain([Upcast(None)]).decode(Part.PERSONAL, torch.zeros(2, 3), (0, 3))


def test_unknown_transforms_are_config_errors():
    with pytest.raises(ConfigError, match="unknown transform 'nope'"):
        chain_for(task_world([0, 1, 2], "fl.transforms=[nope]"))
    with pytest.raises(ConfigError, match="not a subclass"):
        chain_for(task_world([0, 1, 2], "fl.transforms=['torch:Tensor']"))


def test_a_transform_sees_the_whole_update_and_the_start_rows_are_released_after_encoding():
    cfg = task_world([0, 1, 2])

    class JointScale(Transform):
        needs_start = True

        def encode_update(self, u):
            # one factor for every part: the joint norm of the change over all parts
            norm = torch.cat([u.delta(p) for p in u.parts]).norm()
            for p in list(u.parts):
                u.parts[p] = u.start[p] + u.delta(p) / norm

    chain = Chain([JointScale(cfg), WireDtype(cfg)])
    assert chain.needs_start and not chain_for(cfg).needs_start
    u = update()
    with pytest.raises(RuntimeError, match="round-start rows"):
        u.delta(Part.PERSONAL)
    u.start = {p: torch.zeros_like(r) for p, r in u.parts.items()}
    out = chain.encode(u)
    assert out.start is None
    assert float(torch.cat(list(out.parts.values())).norm()) == pytest.approx(1.0)
