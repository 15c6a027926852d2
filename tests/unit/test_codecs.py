"""The exchange's codecs (fl/codecs.py): bytes, layout, error bounds, error feedback."""

import pytest
import torch

from pilot_hpc.fl import codecs
from pilot_hpc.fl.codecs import BLOCK, CodecError, bound, decode_rows, encode_rows, nbytes, span


def within_bound(x, codec):
    raw = encode_rows(x, codec)
    assert raw.dtype == torch.uint8 and raw.numel() == nbytes(codec, x.numel())
    err = (decode_rows(raw, codec, x.numel()) - x).abs()
    return bool((err <= bound(x, codec)).all()), err


def test_bytes_per_row_are_the_codes_plus_one_float32_scale_per_block():
    n = 3 * BLOCK + 5
    assert nbytes("float32", n) == 4 * n and nbytes("bfloat16", n) == 2 * n
    assert nbytes("int8", n) == 3 * (4 + BLOCK) + 4 + 5
    assert nbytes("int4", n) == 3 * (4 + BLOCK // 2) + 4 + 3  # 5 values: 3 bytes (one half empty)
    # float32 bytes over int8 bytes: 4 / (1 + 4 / BLOCK), 3.88x at BLOCK = 128.
    assert (4 << 20) / nbytes("int8", 1 << 20) == pytest.approx(4 / (1 + 4 / BLOCK))


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_random_rows_decode_within_the_bound(codec):
    g = torch.Generator().manual_seed(0)
    for n in (1, BLOCK - 1, BLOCK, 5 * BLOCK + 3, 4096, 2 * codecs.TILE * BLOCK + 5):  # the last: several tiles
        x = torch.randn(n, generator=g) * torch.logspace(-6, 2, n)[torch.randperm(n, generator=g)]
        ok, err = within_bound(x, codec)
        assert ok, (codec, n, float(err.max()))


@pytest.mark.parametrize("codec", codecs.LOSSY_INT)
def test_the_int_bound_is_half_a_step_of_the_block_maximum(codec):
    # Hand-computable: one block 0, 1, ..., with absmax 127 (int8: scale 1, every integer
    # exact) or 7 (int4: scale 1 as well).
    qmax = {"int8": 127, "int4": 7}[codec]
    x = torch.arange(-qmax, qmax + 1, dtype=torch.float32)
    assert torch.equal(decode_rows(encode_rows(x, codec), codec, x.numel()), x)
    # Half-way values round to even and stay within s / 2 = 0.5.
    y = x.clone()
    y[1:-1] += 0.5
    y = y.clamp(-qmax, qmax)
    assert float((decode_rows(encode_rows(y, codec), codec, y.numel()) - y).abs().max()) <= 0.5


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_adversarial_rows_zeros_one_huge_value_per_block_subnormals(codec):
    n = 4 * BLOCK + 7
    zeros = torch.zeros(n)
    assert torch.equal(decode_rows(encode_rows(zeros, codec), codec, n), zeros)
    huge = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-3
    huge[::BLOCK] = 3e38  # one value near float32's maximum in every block: the others drown, within s / 2
    assert within_bound(huge, codec)[0]
    tiny = torch.full((n,), 1e-44)  # subnormal: the scale is subnormal (int codecs) or zero
    tiny[1::3] = -3e-42
    ok, err = within_bound(tiny, codec)
    assert ok, float(err.max())
    assert bool(torch.isfinite(decode_rows(encode_rows(tiny, codec), codec, n)).all())


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_by_name(codec, bad):
    x = torch.ones(300)
    x[200] = bad
    with pytest.raises(CodecError, match=rf"codec {codec}: 1 non-finite value.*client 4"):
        encode_rows(x, codec, where="client 4's personal part")


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_a_column_chunk_is_a_contiguous_byte_span_of_the_row(codec):
    x = torch.randn(2, 5 * BLOCK + 9, generator=torch.Generator().manual_seed(2))
    raw = encode_rows(x, codec)
    for a, b in ((0, 2 * BLOCK), (2 * BLOCK, 5 * BLOCK), (5 * BLOCK, x.shape[1])):
        lo, hi = span(codec, a, b)
        # The span of the whole row's encoding is the encoding of the chunk alone.
        assert torch.equal(raw[:, lo:hi], encode_rows(x[:, a:b], codec))
        assert torch.equal(decode_rows(raw[:, lo:hi], codec, b - a), decode_rows(raw, codec, x.shape[1])[:, a:b])
    if codec in codecs.LOSSY_INT:
        with pytest.raises(ValueError, match="does not start a block"):
            span(codec, 3, BLOCK)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_the_servers_no_answer_rows_travel_back_as_nan(codec):
    x = torch.randn(3, BLOCK + 3)
    x[1] = float("nan")
    out = decode_rows(encode_rows(x, codec, nan_rows=True), codec, x.shape[1])
    assert bool(torch.isnan(out[1]).all()) and bool(torch.isfinite(out[[0, 2]]).all())
    x[2, 0] = float("nan")  # a NaN in an otherwise finite row is still refused
    with pytest.raises(CodecError):
        encode_rows(x, codec, nan_rows=True)


@pytest.mark.parametrize("codec", ["bfloat16", "int8", "int4"])
def test_error_feedback_keeps_the_sum_of_decoded_updates_within_one_step_of_the_true_sum(codec):
    """sum_t decoded_t = sum_t delta_t - residual_T (telescoping), so the running sums
    differ by the last residual alone, which is one step's quantisation error: within
    the bound of the last x = delta + residual, however many rounds. Without feedback
    the errors add up."""
    g = torch.Generator().manual_seed(3)
    n, rounds = 1000, 50
    residual, true_sum, sent_sum, plain_sum = None, torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for _ in range(rounds):
        # A biased update (the same sign every round), where dropped errors accumulate.
        delta = 1e-3 * (torch.rand(n, generator=g) + 0.1)
        x = delta if residual is None else delta + residual
        _, dec, residual = codecs.apply_error_feedback(delta, residual, codec)
        true_sum += delta
        sent_sum += dec
        plain_sum += codecs.roundtrip(delta, codec)[1]
        # float32 accumulation: 50 additions of values ~1e-3 round at ~50 ulps of the sum.
        assert bool(((true_sum - sent_sum).abs() <= bound(x, codec) + 64 * torch.finfo().eps * true_sum).all())
    assert float((true_sum - sent_sum).abs().max()) < float((true_sum - plain_sum).abs().max())


# ---------------------------------------------------------------- config and chain

def test_defaults_keep_the_plain_path_and_wire_dtype_is_the_bfloat16_codec():
    from helpers import task_world
    from pilot_hpc.fl.transforms import Codec, WireDtype, chain_for, coded

    plain = chain_for(task_world([0, 1, 2]))
    assert isinstance(plain.transforms[-1], WireDtype) and plain.wire_dtype == torch.float32 and plain.codec is None
    for extra in (["fl.wire_dtype=bfloat16"], ["fl.codec=bfloat16"]):
        cfg = task_world([0, 1, 2], *extra)
        assert cfg.fl.codecs() == ("bfloat16", "bfloat16") and not coded(cfg)
        assert chain_for(cfg).wire_dtype == torch.bfloat16
    for extra, pair in ((["fl.codec=int8"], ("int8", "int8")), (["fl.codec=int4", "fl.codec_down=float32"],
                                                                 ("int4", "float32")),
                        (["fl.codec_down=bfloat16"], ("float32", "bfloat16"))):
        cfg = task_world([0, 1, 2], *extra)
        chain = chain_for(cfg)
        assert cfg.fl.codecs() == pair and coded(cfg)
        assert isinstance(chain.codec, Codec) and chain.needs_start


def test_a_codec_that_contradicts_wire_dtype_or_is_unknown_is_refused_naming_the_key():
    from helpers import task_world
    from pilot_hpc.config import ConfigError

    with pytest.raises(ConfigError, match="fl.codec=int8 and fl.wire_dtype=bfloat16 disagree"):
        task_world([0, 1, 2], "fl.codec=int8", "fl.wire_dtype=bfloat16")
    with pytest.raises(ConfigError, match="fl.codec must be one of"):
        task_world([0, 1, 2], "fl.codec=int2")
    with pytest.raises(ConfigError, match="fl.codec_down must be one of"):
        task_world([0, 1, 2], "fl.codec_down=fp8")


def test_the_codec_transform_sends_the_encoded_change_and_keeps_the_residual():
    from helpers import task_world
    from pilot_hpc.fl.transforms import chain_for
    from pilot_hpc.fl.update import ClientUpdate, Form, Part, Participation

    chain = chain_for(task_world([0, 1, 2], "fl.codec=int8"))
    g = torch.Generator().manual_seed(4)
    start = {p: torch.randn(300, generator=g) for p in (Part.SHARED_BY_TASK, Part.PERSONAL)}
    trained = {p: start[p] + 1e-3 * torch.randn(300, generator=g) for p in start}
    u = ClientUpdate(client=2, parts=dict(trained), num_samples=5, status=Participation.PARTICIPATED, round=1,
                     start=dict(start))
    chain.encode(u)
    assert u.form is Form.DELTA and u.start is None
    for p in start:
        delta = trained[p] - start[p]
        sent = decode_rows(u.parts[p], "int8", 300)
        assert u.parts[p].dtype == torch.uint8 and u.parts[p].numel() == nbytes("int8", 300)
        assert bool(((sent - delta).abs() <= bound(delta, "int8")).all())
        assert torch.equal(u.residual[p.value], delta - sent)  # no residual before: x = delta
    # An excluded client sends its zero row and keeps the residual it had.
    kept = {k: v.clone() for k, v in u.residual.items()}
    z = ClientUpdate(client=2, parts={p: torch.zeros(300) for p in start}, num_samples=5,
                     status=Participation.EXCLUDED_NONFINITE, round=2, start=dict(start), residual=kept)
    chain.encode(z)
    assert all(not bool(decode_rows(z.parts[p], "int8", 300).any()) for p in start)
    assert all(z.residual[k] is kept[k] for k in kept) and sorted(z.residual) == sorted(kept)


def test_fedadam_on_mixed_changes_takes_the_same_step_as_on_the_mean_model():
    """The server's w plus the returned step is the step the parameter path takes from the
    mean model w + delta (float32: the two paths differ by the rounding of w + delta)."""
    from helpers import task_world
    from pilot_hpc.fl.strategies.fedadam import FedAdamServer
    from pilot_hpc.fl.update import Part

    cfg = task_world([0, 1, 2], "fl.strategy=fedadam")
    g = torch.Generator().manual_seed(5)
    w0 = {Part.SHARED_BY_TASK: torch.randn(6, generator=g), Part.PERSONAL: torch.randn(4, generator=g)}
    delta = 1e-2 * torch.randn(1, 4, generator=g)
    params, changes = FedAdamServer(cfg), FedAdamServer(cfg)
    changes.mixes_changes = True
    for s in (params, changes):
        s.init_server(w0)
    mean_model = (w0[Part.PERSONAL] + delta[0])[None].expand(3, -1).clone()
    mixed_change = delta.expand(3, -1).clone()
    params.finish(Part.PERSONAL, mean_model, 0)
    changes.finish(Part.PERSONAL, mixed_change, 0)
    # 1e-6: a few float32 ulps of values ~1 (w + delta rounded once in the parameter path).
    assert torch.allclose(w0[Part.PERSONAL] + mixed_change[0], mean_model[0], atol=1e-6, rtol=0)
    assert torch.allclose(changes.state["m"], params.state["m"], atol=1e-6, rtol=0)
    assert not torch.equal(mixed_change[0], mean_model[0])  # a step, not parameters


def test_the_board_gets_one_clients_bytes_and_the_ratios(tmp_path):
    pytest.importorskip("tensorboard")
    from pilot_hpc.fl.coded import round_bytes, round_entry
    from pilot_hpc.tensorboard import Board, read_scalars

    class Exchanger:  # what CodedExchange keeps after a round
        bytes = round_bytes("int8", "int4", (1000, 3000), 3, 2)

    entry = round_entry(Exchanger())["bytes"]
    # Hand-computed: 1000 values = 7 full blocks + 104; int8 up, twice the personal part (ATA).
    assert entry["up"] == (7 * 132 + 4 + 104) + 2 * (23 * 132 + 4 + 56)
    assert entry["down"] == 3 * (7 * 68 + 4 + 52) + (23 * 68 + 4 + 28)
    assert round_entry(object()) == {}  # the plain exchange adds nothing to metrics.json
    board = Board(str(tmp_path))
    board.log_round(1, [], {}, {}, None, 1.0, lr=lambda step, total: 0.0, batch_size=4, codec=entry)
    board.close()
    got = read_scalars(str(tmp_path))
    assert dict(got["exchange/client_up"]) == {1: float(entry["up"])}
    assert dict(got["exchange/ratio_down"])[1] == pytest.approx(entry["ratio_down"], rel=1e-6)  # float32 events
