"""adopt_triton: the ADOPT optimizer with fused Triton kernels.

``from adopt_triton import ADOPT`` is a drop-in for torch-adopt's
``from adopt import ADOPT``; ``adopt_triton.adopt`` is the functional form
(lists of tensors, as ``torch.optim.adam.adam``).
"""
from adopt_triton.common import Hyper, Scaling, Tensors
from adopt_triton.optimizer import ADOPT, ADOPT8bit
from adopt_triton.program import adopt

__all__ = ["ADOPT", "ADOPT8bit", "adopt", "Hyper", "Scaling", "Tensors"]
__version__ = "0.1.0"
