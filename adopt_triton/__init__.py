"""adopt_triton: the ADOPT optimizer with fused Triton kernels.

``from adopt_triton import ADOPT`` is a drop-in for torch-adopt's
``from adopt import ADOPT``.
"""
from adopt_triton.optimizer import ADOPT

__all__ = ["ADOPT"]
__version__ = "0.1.0"
