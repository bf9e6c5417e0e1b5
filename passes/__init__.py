"""Graph passes, one module per pass. ``PASSES`` maps each pass's CLI name to its class."""
from __future__ import annotations

from passes.decode_branch import DecodeBranchPass
from passes.fp16 import Fp16Pass
from passes.fuse_gqa import FuseGqaPass
from passes.fuse_rmsnorm import FuseRmsNormPass
from passes.fuse_rotary import FuseRotaryPass
from passes.kv_rename import KvRenamePass
from passes.logits_to_keep import LogitsToKeepPass
from passes.matmul_int8 import MatMulInt8Pass
from passes.matmul_nbits import MatMulNBitsPass
from passes.matmul_w4 import MatMulW4Pass
from passes.pack_gqa import PackGqaPass
from passes.pack_matmul import PackMatMulPass
from passes.tied_embedding import TiedEmbeddingPass

PASSES = {cls.name: cls for cls in (KvRenamePass, FuseRmsNormPass, FuseRotaryPass, FuseGqaPass, TiedEmbeddingPass,
                                    PackMatMulPass, PackGqaPass, MatMulNBitsPass, MatMulInt8Pass, Fp16Pass,
                                    LogitsToKeepPass, MatMulW4Pass, DecodeBranchPass)}

__all__ = ["PASSES", "DecodeBranchPass", "Fp16Pass", "FuseGqaPass", "FuseRmsNormPass", "FuseRotaryPass", "KvRenamePass", "LogitsToKeepPass",
           "MatMulInt8Pass", "MatMulNBitsPass", "MatMulW4Pass", "PackGqaPass", "PackMatMulPass", "TiedEmbeddingPass"]
