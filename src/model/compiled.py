"""--compile: torch.compile of a network, for training and evaluation.

HSPA layers run outside the compiled graphs (torch.compiler.disable on each layer's forward, one graph
break per layer): their exact kernels are autograd Functions around native C (through ctypes), Triton or
blocked torch code, which Dynamo does not trace (it breaks the graph inside them, and compiling the tiny
test network that way took minutes). Everything around them (convolutions, PReLUs, upsampler) is compiled.
"""

from __future__ import annotations

import torch
from torch import nn

from model.hspa import HSPA

EAGER_LAYERS: tuple[type[nn.Module], ...] = (HSPA,)


def compile_network(net: nn.Module) -> nn.Module:
    """The torch.compile'd network, sharing the network's weights (its own state dict, with '_orig_mod.'
    keys, is never saved); the layers of EAGER_LAYERS run eagerly."""
    for module in net.modules():
        if isinstance(module, EAGER_LAYERS):
            module.forward = torch.compiler.disable(module.forward)
    return torch.compile(net)
