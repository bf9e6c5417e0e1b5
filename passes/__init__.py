"""Graph passes, one module per pass. ``PASSES`` maps each pass's CLI name to its class."""
from __future__ import annotations

from passes.fp16 import Fp16Pass
from passes.kv_rename import KvRenamePass
from passes.matmul_int8 import MatMulInt8Pass
from passes.matmul_nbits import MatMulNBitsPass
from passes.tied_embedding import TiedEmbeddingPass

PASSES = {cls.name: cls for cls in (KvRenamePass, TiedEmbeddingPass, MatMulNBitsPass, MatMulInt8Pass, Fp16Pass)}

__all__ = ["PASSES", "Fp16Pass", "KvRenamePass", "MatMulInt8Pass", "MatMulNBitsPass"]
