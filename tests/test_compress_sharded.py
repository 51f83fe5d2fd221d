"""Tensor-parallel shards of the factorized maps against the unsharded map."""

import pytest
import torch

from grass_llm.compress import FactGraSS, LoGra
from grass_llm.compress.sharded import shard_compressor

TOL = dict(rtol=1e-12, atol=1e-12)  # float64; only summation order differs


def _ranges(n, parts):
    """torch.chunk-style uneven split of range(n) into parts."""
    size = -(-n // parts)
    return [(min(n, i * size), min(n, (i + 1) * size)) for i in range(parts)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("make", [
    lambda b: FactGraSS(17, 13, k=23, k_in=7, k_out=5, c=2, seed=3, bias=b),
    lambda b: FactGraSS(17, 13, k=23, k_in=17 + b, k_out=13, seed=4, bias=b),  # full masks
    lambda b: LoGra(17, 13, k_in=4, k_out=3, seed=5, bias=b),
])
def test_shards_recombine_to_the_unsharded_map(make, side, parts, bias):
    full = make(bias)
    x = torch.randn(3, 6, 17, dtype=torch.float64)
    d = torch.randn(3, 6, 13, dtype=torch.float64)
    expected = full(x, d)
    expected_tok = full.per_token(x, d)
    n = 13 if side == "out" else 17
    total = torch.zeros_like(expected)
    total_tok = torch.zeros_like(expected_tok)
    xf_sum = df_sum = None
    shards = []
    for rank, (a, b) in enumerate(_ranges(n, parts)):
        out_r, in_r = ((a, b), (0, 17)) if side == "out" else ((0, 13), (a, b))
        # a replicated bias (rowwise) is counted once; a colwise bias is sharded with the rows
        own_bias = side == "out" or rank == 0
        sh = shard_compressor(full, out_r, in_r, own_bias)
        xl = x[..., in_r[0]:in_r[1]]
        dl = d[..., out_r[0]:out_r[1]]
        xf, df = sh.input_features(xl), sh.output_features(dl)
        if sh.partial:
            total += sh.combine(xf, df)
            total_tok += sh.combine_per_token(xf, df)
        else:  # LoGra: sum the projected features over the group, then combine
            xf_sum = xf if xf_sum is None or not sh.reduce_input else xf_sum + xf
            df_sum = df if df_sum is None or not sh.reduce_output else df_sum + df
            shards.append(sh)
    if shards:
        total = shards[0].combine(xf_sum, df_sum)
        total_tok = shards[0].combine_per_token(xf_sum, df_sum)
    torch.testing.assert_close(total, expected, **TOL)
    torch.testing.assert_close(total_tok, expected_tok, **TOL)


def test_vector_compressors_cannot_be_sharded():
    from grass_llm.compress import GraSS

    with pytest.raises(ValueError, match="factgrass and logra"):
        shard_compressor(GraSS(100, 4, 8), (0, 5), (0, 20))
    with pytest.raises(ValueError, match="out_range"):
        shard_compressor(FactGraSS(8, 6, k=4, k_in=2, k_out=2), (0, 7), (0, 8))
