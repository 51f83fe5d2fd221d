"""Gradient compression: GraSS, FactGraSS and the baselines of the GraSS paper.

Pure math: no models and no I/O, except reading a learned-mask file that a ``factgrass`` spec
names (``mask_file``). Every compressor is a linear map with an exact ``dense_matrix()``
equivalent, built deterministically from an integer seed (and that file's indices).
"""

from grass_llm.compress._hash import derive_seed
from grass_llm.compress.base import Compressor, FactorizedCompressor, VectorCompressor
from grass_llm.compress.dense import FJLT, Gaussian, Rademacher
from grass_llm.compress.factorized import FactGraSS, LoGra
from grass_llm.compress.identity import Identity
from grass_llm.compress.registry import (
    available_compressors,
    build_compressor,
    check_spec,
    parse_spec,
    register_compressor,
)
from grass_llm.compress.selective import SelectiveMask, fit_factorized_mask
from grass_llm.compress.sparse import SJLT, GraSS, RandomMask

for _cls in (RandomMask, SJLT, GraSS, Gaussian, Rademacher, FJLT, SelectiveMask, Identity,
             FactGraSS, LoGra):
    register_compressor(_cls)

__all__ = [
    "Compressor", "VectorCompressor", "FactorizedCompressor", "RandomMask", "SJLT", "GraSS",
    "Gaussian", "Rademacher", "FJLT", "SelectiveMask", "Identity", "FactGraSS", "LoGra",
    "build_compressor", "check_spec", "parse_spec", "register_compressor",
    "available_compressors", "derive_seed", "fit_factorized_mask",
]
