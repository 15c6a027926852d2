"""The streamed exchange (fl/stream.py) under real `mpiexec` worlds, against the one-shot
aggregation; chunking helpers; messages over 2 GiB."""

import pytest
import torch

from helpers import run_mpi_check
from pilot_hpc.fl import aggregate
from pilot_hpc.fl.stream import SUB_BLOCK, chunk_columns, gram_in_place, mix_in_place, spans


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_streamed_exchange_equals_the_one_shot_aggregation(ranks):
    """Every strategy's server step, chunk not dividing the parts, K > W (uneven blocks),
    an empty visual part, a rank (the server) with no client, a bad client, bf16, FedAdam's state over
    two rounds."""
    run_mpi_check("stream_check.py", ranks)


def test_messages_over_two_gib():
    run_mpi_check("large_message_check.py", 2, timeout=300)


def test_chunk_columns_and_spans():
    assert chunk_columns(1.0, 4, 10 ** 9) == 2 ** 18  # 1 MiB of float32
    assert chunk_columns(0.1, 4, 10 ** 9) == SUB_BLOCK  # 26214 columns, rounded down to the sub-block grid
    assert chunk_columns(0.01, 4, 10 ** 9) == 2621  # below one sub-block: as asked
    assert chunk_columns(0, 2, 12345) == 12345  # unchunked: the whole part
    assert chunk_columns(1e-9, 4, 100) == 1  # never zero columns
    assert spans(3, 10, 3) == [(3, 6), (6, 9), (9, 10)]
    assert spans(5, 5, 3) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_in_place_matches_a_matmul_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(5, 37, generator=gen).to(dtype)  # 37 columns: sub-blocks do not divide it
    coef = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    ref = (coef.float() @ block.float()).to(dtype)
    got = mix_in_place(coef, block.clone(), torch.device("cpu"))
    # float32: the same products summed in the same order per column -> exact;
    # bf16: one rounding of the float32 result on both sides -> exact as well.
    torch.testing.assert_close(got, ref, rtol=0, atol=0)



def test_centred_gram_keeps_the_distances_of_close_updates():
    """LoRA updates of clients that started from one point: norm ~ 1e3, distances ~ 1e-2.
    An uncentred float32 Gram loses them (|a|^2 ~ 1e6 has a float32 ulp of 0.06); the
    centred one keeps them to float32 precision of the distances themselves."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3 * SUB_BLOCK + 7, generator=gen, dtype=torch.float64) * 6.0
    block = (base + 1e-4 * torch.randn(5, base.shape[1], generator=gen, dtype=torch.float64)).float()
    ref = torch.cdist(block.double(), block.double())
    gram = torch.zeros(5, 5, dtype=torch.float64)
    gram_in_place(gram, block, torch.device("cpu"), ref=2)
    # float32 products of centred rows: ~1e-7 relative error per entry, on distances ~ 1e-2.
    torch.testing.assert_close(aggregate.distances_from_gram(gram), ref, rtol=1e-4, atol=1e-7)
    naive = aggregate.distances_from_gram((block @ block.T).double())
    assert (naive - ref).abs().max() > 1e-3  # what centring is for


def test_mix_in_place_refuses_more_rows_than_clients():
    with pytest.raises(ValueError, match="do not fit"):
        mix_in_place(torch.ones(4, 3, dtype=torch.float64), torch.ones(3, 5), torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned staging, on-device mixing)")
def test_cuda_staging_and_mixing_match_the_cpu():
    from pilot_hpc.fl.stream import HostChunks

    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(3, 1000, generator=gen).to(torch.bfloat16)
    chunks = spans(0, 1000, 301)
    on_gpu = HostChunks(rows.cuda(), chunks)
    on_cpu = HostChunks(rows, chunks)
    for i in range(len(chunks)):  # the double-buffered async copies deliver the same words
        assert (on_gpu[i] == on_cpu[i]).all()
    coef = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    block = torch.randn(3, 40000, generator=gen)
    cpu = mix_in_place(coef, block.clone(), torch.device("cpu"))
    gpu = mix_in_place(coef, block.clone().pin_memory(), torch.device("cuda"))
    # float32 GEMMs of 3 terms per value; TF32 is off by default for matmul in torch.
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
