"""What a network must and may provide to the Model wrapper.

A model is a module `src/nlsr/model/networks/<name>.py`, listed in model/registry.py, that defines

- `make_model(args) -> SRNetwork`: builds the network from the parsed flags; raises ValueError naming the
  flag (e.g. '--reduction 16: ...') for a value the network cannot use;
- `FLAGS`: the model flags make_model reads (see MODEL_FLAGS); a flag of that list given on the command
  line and not read by the model is refused.

The network is an `SRNetwork`: an nn.Module with `forward(lr) -> sr` and

- `config`: the flags that shape it (their parsed values, 'scale' as one int; a multi_scale network with
  weights per scale, MDSR, gives the list of its scales). Checkpoints carry it, so
  `--test_only --pre_train X` rebuilds the same network without architecture flags;
- `infer_config(state_dict)`: the same flags read back from a bare state dict, as far as its keys and
  shapes tell (used to explain a checkpoint that does not fit);
- `chop_rule(scale)`: how --chop cuts the LR image (the published rule of that model);
- `multi_scale` / `set_scale(idx_scale)`: a network serving every --scale itself; otherwise the wrapper
  builds one network per scale;
- `unused_keys()`: the entries of the published checkpoints that the network does not hold (a parameter the
  published network registers but never uses, a module it saves twice); the loader drops exactly these when
  present, and refuses every other key the network lacks;
- `random_draws` / `drawing_from(generator)`: a network whose forward draws random numbers (NLSN's hash
  rotations) sets random_draws and, inside `with net.drawing_from(g):`, draws them all from the
  torch.Generator g, in a fixed order (outside: from torch's global generator, as in training). The
  wrapper gives each evaluation forward, i.e. one image with all its chop quarters, tiles and self-ensemble
  passes in their fixed order, a fresh generator seeded with the seed its caller passes (the evaluation
  loop and upscale.py: training.seeding.image_seed(--seed, file name); --seed otherwise). So an image's
  output depends neither on the images before it, nor on the loader order, nor on the number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# Flags that only some models read; each model names the ones it reads in its FLAGS.
MODEL_FLAGS = ('n_resgroups', 'n_resblocks', 'n_feats', 'res_scale', 'reduction', 'topk', 'attention',
               'attention_every', 'hspa_impl', 'hspa_block', 'G0', 'RDNkSize', 'RDNconfig', 'depth', 'chunk_size',
               'n_hashes')
# Model flags that choose how a network computes, not what it computes: a checkpoint may record them, but a
# value given on the command line wins over it (HSPA's threshold is exact whatever topk is).
HOW_FLAGS = ('topk', 'hspa_impl', 'hspa_block')


@dataclass(frozen=True)
class ChopRule:
    """The published forward_chop of a model: quarters overlapping by `shave` LR pixels, split further
    while a quarter has at least `min_size` pixels. With h_mult/w_mult > 0, a quarter's height/width is
    rounded up to the next multiple (always adding at least 1, as published); 0 leaves it as it is. With
    add_remainder, the size grows by its remainder modulo h_mult/w_mult instead (PA-EDSR's forward_chop:
    `h_size += h_size % scale`, not always a multiple)."""

    shave: int = 10
    min_size: int = 160000
    h_mult: int = 0
    w_mult: int = 0
    add_remainder: bool = False


# EDSR-PyTorch's forward_chop: shave 10, min_size 160000, no rounding.
EDSR_CHOP = ChopRule()



def exporting() -> bool:
    """True while torch.onnx.export (or torch.jit.trace) records a graph: networks then take their
    fixed-shape paths (no data-dependent branch for the trace to freeze)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class SRNetwork(nn.Module):
    """Base class of the networks: defaults for everything the contract lets a network leave out."""

    multi_scale = False
    # Why torch.onnx.export cannot record this network (a loop over the image size, random draws); '' if it can.
    export_refusal = ''
    random_draws = False  # True: forward draws random numbers, from drawing_from's generator when given

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, object] = {}  # subclasses fill it in __init__

    @staticmethod
    def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
        return {}

    def chop_rule(self, scale: int) -> ChopRule:
        return EDSR_CHOP

    def unused_keys(self) -> frozenset[str]:
        return frozenset()

    @contextlib.contextmanager
    def drawing_from(self, generator: torch.Generator | None) -> Iterator[None]:
        """Forwards within the block draw their random numbers from `generator` (random_draws networks)."""
        yield

    def set_scale(self, idx_scale: int) -> None:
        """Select the scale of the next forward (multi-scale networks)."""
