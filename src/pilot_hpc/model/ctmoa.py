"""Cross-task mixture of adapters (CT-MoA): the math, re-exported for the model code.

The definition (types, the PyTorch reference `ctmoa_reference` and the auxiliary
losses) lives in `pilot_hpc_kernels.ctmoa_reference`, a leaf next to the fused kernels
that imports only torch, so the kernels package needs nothing from pilot_hpc. This
module keeps every name the model, training and tests import from here.
"""

from pilot_hpc_kernels.ctmoa_reference import (AdapterWeights, CTMoAOutput, RouterStats, adapter_forward,
                                               ctmoa_reference, load_balance_loss, mlp_expert_index,
                                               router_reference, z_loss)

__all__ = ["AdapterWeights", "CTMoAOutput", "RouterStats", "adapter_forward", "ctmoa_reference",
           "load_balance_loss", "mlp_expert_index", "router_reference", "z_loss"]
