"""The first pass's per-block Gram accumulation (cfsp.engine.streamed_spill.GramMoments)."""

from __future__ import annotations

import torch

from cfsp.engine.statistics import BlockStats
from cfsp.engine.streamed_spill import GramMoments, read_block, write_block


def _batches(dtype: torch.dtype, n: int = 48) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(n, n, generator=gen)
    return [(torch.randn(4, 16, n, generator=gen) @ mix + 0.3).to(dtype) for _ in range(5)]


def test_bfloat16_rows_give_the_float32_gram_of_the_same_values(tmp_path):
    """bf16 activations: rows kept, one GEMM at write time; the Gram matches the float32 Gram of
    the same (bf16-exact) values to bf16 rounding, and the kept rows are freed."""
    batches = _batches(torch.bfloat16)
    st, o = GramMoments.empty(48), GramMoments.empty(48)
    for x in batches:
        st.add(x)
        o.add(x)
    assert len(st.pending) == 5 and st.count == 5 * 64
    exact = sum(x.reshape(-1, 48).double().T @ x.reshape(-1, 48).double() for x in batches)
    stats = BlockStats(0.1, st.count, o, st)
    write_block(tmp_path, 0, stats)
    assert st.pending == []
    rel = (st.gram.double() - exact).norm() / exact.norm()
    assert 0 < rel < 4e-3  # one bf16 rounding of the [n, n] result
    back = read_block(tmp_path, 0)
    torch.testing.assert_close(back.down.gram, st.gram.to(back.down.gram.dtype))
    torch.testing.assert_close(st.sq, exact.diagonal())  # the moments stay exact


def test_float32_rows_are_added_batch_by_batch():
    batches = _batches(torch.float32)
    st = GramMoments.empty(48)
    for x in batches:
        st.add(x)
    assert st.pending == []
    exact = sum(x.reshape(-1, 48).double().T @ x.reshape(-1, 48).double() for x in batches)
    assert (st.gram.double() - exact).norm() / exact.norm() < 1e-5
