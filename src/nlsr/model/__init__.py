"""The networks and what surrounds them (EDSR shape).

    Model(args, log, configured) the network(s) of --model on their device: checkpoint I/O, test-time forwards
                                 (configured: the --pre_train file option.build read, so it is read once)

    registry.py    --model names -> network modules (networks/: one file each, following contract.py)
    wrapper.py     Model: device, DataParallel/DDP, precision, one network per scale, save/load, --chop/--tile
    checkpoint.py  model files: read, fit strictly, write atomically; the flags a file's configuration states
    contract.py    what a network provides; tiling.py: the test-time cuts; blocks/, common.py: building blocks
    attention.py   HSPA's published import path and the softmax non-local attention; hspa/: the operator
"""

from nlsr.model.checkpoint import Configured, configuration_note
from nlsr.model.registry import check_model_flags, make_network, registered_models, resolve_model_name
from nlsr.model.wrapper import Model

__all__ = ['Configured', 'Model', 'check_model_flags', 'configuration_note', 'make_network',
           'registered_models', 'resolve_model_name']
