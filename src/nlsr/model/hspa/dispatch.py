"""Which HSPA algorithm runs when: the one dispatcher of the operator.

Every HSPA forward asks ``plan(...)``; nothing else chooses an algorithm or a back-end.

================  =======================  ==============================================================
device            impl                     runs
================  =======================  ==============================================================
any               any, while exporting     ``export``: fixed-shape exact sparsemax (export.py, ONNX)
any               dense                    ``dense``: the published (L x L) scores, float32
CPU               auto, blocked            ``blocked``, as the whole layer fused (``fused``: embeddings
                                           recomputed in backward) when the layer is fusable (published
                                           1x1 conv + PReLU embeddings, no hooks, float32/64, autocast
                                           off); on the ``native`` C kernels, or on ``torch`` where no C
                                           compiler works (auto says so once; native.unavailable_reason)
CUDA              auto                     ``dense`` while ``dense_fits`` (its peak, counted in float32
                                           (batch, L, L) scores, within DENSE_SHARE of the GPU memory free
                                           now: read on every plan); above it ``triton`` with the triton
                                           package and query/key widths the kernels take, else ``blocked``
                                           on ``torch`` (auto says why once)
CUDA              blocked                  ``blocked`` (fused or not) on ``torch``
CUDA              triton                   ``triton``; ValueError without the triton package or for a
                                           query/key width the kernels do not take
CPU               triton                   ``triton`` under TRITON_INTERPRET=1 (tests); else ValueError
================  =======================  ==============================================================

Impl names are 'auto' and the paths an impl can force (IMPLS); 'fast', the earlier name of 'blocked', is
read as 'blocked' (``canonical_impl``). MSNLAN's cross-scale attention asks ``plan_cross_scale`` (the same
impl names; paths dense and blocked).
An explicit impl that cannot run raises ValueError with one line; ``auto`` never raises, it falls back
and the plan's ``note`` says why. ``PlanLog`` says each distinct plan once. While torch.compile traces a
forward, ``plan_constant`` takes the plan instead: it runs then and its result is a constant of the graph
(no planning or logging inside the compiled code).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlsr.model.hspa import native
from nlsr.model.hspa import triton as fused

# One vocabulary: an impl is 'auto' or the path it forces; a plan's path is one of PATHS, and 'blocked' runs
# on a back-end (BACKENDS), as the whole layer fused where the layer allows (Plan.fused).
PATHS = ('dense', 'blocked', 'triton', 'export')
IMPLS = ('auto', 'dense', 'blocked', 'triton')
BACKENDS = ('native', 'torch')
# Earlier names, still read (command lines, saved configurations) and said in the current vocabulary.
ALIASES = {'fast': 'blocked'}
# MSNLAN's cross-scale attention takes the same names but has no Triton kernel (plan_cross_scale).
CROSS_SCALE_IMPLS = ('auto', 'dense', 'blocked')
# plan_cross_scale with impl 'auto': maps of at most this many scores per image (32 MiB in float32) take the
# published dense arithmetic (cheap there, and bit-compatible), larger ones the blocked computation.
CROSS_SCALE_DENSE_MAX = 8 * 2**20
# impl='auto' on CUDA runs the dense path while its peak takes at most this share of the free memory
# (the rest: the network's other activations and the allocator's fragmentation).
DENSE_SHARE = 0.5
# The dense path's memory in units of its (batch, L, L) float32 scores. Transient, during soft thresholding:
# the scores, their shifted copy, the sorted values with their int64 indices (rows that need the full sort),
# the cumulative sums, the rank products, the output and the comparison masks: about 4x on rows the first
# top-k solves, up to about 9x on rows that need the full sort (which cannot be told before sorting).
DENSE_TRANSIENT = 9
# Retained: in training each layer keeps its sparsemax output for backward until backward reaches it.
# Earlier layers' retained outputs are already allocated when a later layer plans (free memory is read
# on every plan), so the rule counts the planning layer's own.
DENSE_RETAINED = 1

_logger = logging.getLogger('nlsr.hspa')


@dataclass(frozen=True)
class Plan:
    """One forward's algorithm: ``path`` (one of PATHS), the ``backend`` of blocked (one of BACKENDS; ''
    otherwise), the ``impl`` asked for (one of IMPLS), the ``device`` type, a ``note`` on a fallback, and
    whether blocked runs as the whole layer fused (``fused``)."""

    path: str
    backend: str
    impl: str
    device: str
    note: str = ''
    fused: bool = False

    def describe(self) -> str:
        """One line, e.g. 'HSPA: auto on cpu -> blocked (whole layer fused, native CPU kernel ...)'."""
        what = {'dense': 'published dense (L x L) scores', 'triton': 'fused Triton kernels',
                'export': 'fixed-shape exact sparsemax for export'}.get(self.path)
        if what is None:
            what = native.describe() if self.backend == 'native' else 'torch back-end'
            what = f'whole layer fused, {what}' if self.fused else what
        note = f'; {self.note}' if self.note else ''
        return f'HSPA: {self.impl} on {self.device} -> {self.path} ({what}{note})'


def canonical_impl(impl: str, names: tuple[str, ...] = IMPLS, what: str = 'HSPA impl') -> str:
    """``impl`` in the current vocabulary (ALIASES read as their new names); ValueError naming ``names``
    for anything else."""
    impl = ALIASES.get(impl, impl)
    if impl not in names:
        raise ValueError(f"{what} must be one of {', '.join(names)}; got {impl!r}")
    return impl


def cuda_free_bytes(index: int) -> int:
    """Memory of CUDA device ``index`` that a new tensor can take now: the device's free memory plus what
    torch's caching allocator holds unused. Read on every plan: the optimizer's state, earlier layers'
    activations and other jobs on the GPU change it."""
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return int(torch.cuda.mem_get_info(index)[0]) + max(0, int(cached))


def dense_fits(batch: int, length: int, free_bytes: int, training: bool = False) -> bool:
    """The ``auto`` rule on CUDA: whether the dense path's peak, DENSE_TRANSIENT (+ DENSE_RETAINED when
    ``training``) times its (batch, L, L) float32 scores, takes at most DENSE_SHARE of ``free_bytes``. It is
    a memory rule, not a speed rule: where the dense path fits it is the faster one (its two matmuls do
    2 L^2 (Ck + C) FLOPs at cuBLAS rates, while the fused kernels recompute the scores on every Michelot pass
    and every backward pass, about 3.5x the FLOPs in forward; benchmarks/README.md, roofline estimate)."""
    factor = DENSE_TRANSIENT + (DENSE_RETAINED if training else 0)
    return batch * length * length * 4 * factor <= DENSE_SHARE * free_bytes


def _triton_runs_here(device: torch.device) -> bool:
    return device.type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1'


def plan(impl: str, device: torch.device, batch: int, length: int, *, fusable: bool = False,
         exporting: bool = False, training: bool = False, widths: tuple[int, int] | None = None) -> Plan:
    """The algorithm of one HSPA forward over ``batch`` maps of ``length`` = H * W positions (see the
    module's table). ``fusable``: the layer's embeddings are the published ones (model.hspa.layer.fusable).
    ``exporting``: the forward is being traced for ONNX export. ``training``: the forward keeps what its
    backward needs. ``widths``: the (query/key, value) widths, checked against what the fused kernels take
    (None: not checked)."""
    impl = canonical_impl(impl)
    kind = device.type
    if exporting:
        return Plan('export', '', impl, kind)
    if impl == 'dense':
        return Plan('dense', '', impl, kind)
    if impl == 'triton':
        if not fused.available():
            raise ValueError(fused.MISSING)
        if not _triton_runs_here(device):
            raise ValueError(f"HSPA impl 'triton' runs on CUDA devices (on the CPU only under TRITON_INTERPRET=1); "
                             f'the input is on {device}')
        if widths is not None and not fused.supports(device, *widths):
            raise ValueError(f"HSPA impl 'triton': {fused.unsupported_reason(widths[0])}")
        return Plan('triton', '', impl, kind)
    note = ''
    if impl == 'auto' and kind == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        if dense_fits(batch, length, cuda_free_bytes(index), training):
            return Plan('dense', '', impl, kind)
        if not fused.available():
            note = 'no triton package: the dense peak exceeds its share of GPU memory'
        elif widths is not None and not fused.supports(device, *widths):
            note = f'{fused.unsupported_reason(widths[0])}: the dense peak exceeds its share of GPU memory'
        else:
            return Plan('triton', '', impl, kind)
    if kind == 'cpu' and native.load() is not None:
        return Plan('blocked', 'native', impl, kind, fused=fusable)
    if kind == 'cpu':
        note = f'no native kernels: {native.unavailable_reason()}'
    return Plan('blocked', 'torch', impl, kind, note, fused=fusable)


@fused.traced_as_constant
def plan_constant(impl: str, device: torch.device, batch: int, length: int, *, fusable: bool = False,
                  exporting: bool = False, training: bool = False, widths: tuple[int, int] | None = None) -> Plan:
    """``plan`` while torch.compile traces: run then (not traced) and its result kept in the graph, so a
    compiled forward does not plan again (on CUDA 'auto' the free memory is read once per compiled graph)."""
    return plan(impl, device, batch, length, fusable=fusable, exporting=exporting, training=training, widths=widths)


def plan_forward(impl: str, device: torch.device, batch: int, length: int, *, fusable: bool = False,
                 exporting: bool = False, training: bool = False, widths: tuple[int, int] | None = None) -> Plan:
    """The plan of a forward running now: ``plan``, or ``plan_constant`` while torch.compile traces. Only
    CUDA's 'auto' reads the sizes (its memory rule), so elsewhere a traced forward does not pass them (they
    would only specialise the graph)."""
    if torch.compiler.is_compiling():
        sizes = (int(batch), int(length)) if device.type == 'cuda' else (0, 0)
        return plan_constant(impl, device, *sizes, fusable=fusable, exporting=exporting, training=training,
                             widths=widths)
    return plan(impl, device, batch, length, fusable=fusable, exporting=exporting, training=training, widths=widths)


def plan_cross_scale(impl: str, device: torch.device, scores: int, block_size: int = 0) -> Plan:
    """The algorithm of MSNLAN's cross-scale (patch) attention over a map of ``scores`` = positions x patches
    per image, for the same ``impl`` names: 'dense' the published (positions x patches) map; 'blocked' the
    blocked computation (model.cross_scale, torch back-end); 'auto' 'dense' up to CROSS_SCALE_DENSE_MAX
    scores per image without a ``block_size``, else 'blocked'; 'triton' ValueError (no fused kernel for
    patch attention). ``exporting()`` callers run their traced form before asking."""
    impl = canonical_impl(impl, CROSS_SCALE_IMPLS, "MSNLAN's attention impl (no Triton kernel)")
    dense = impl == 'dense' or (impl == 'auto' and not block_size and scores <= CROSS_SCALE_DENSE_MAX)
    return Plan('dense', '', impl, device.type) if dense else Plan('blocked', 'torch', impl, device.type)


class PlanLog:
    """Says each distinct plan once, through ``write`` (default: the 'nlsr.hspa' logger at INFO, and a plan
    with a fallback note at WARNING). Shared by every layer of a network; copies of a network (deepcopy)
    share it too."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write
        self.seen: set[Plan] = set()

    def __call__(self, p: Plan) -> None:
        if p in self.seen:
            return
        self.seen.add(p)
        if self.write is not None:
            self.write(p.describe())
        else:
            _logger.log(logging.WARNING if p.note else logging.INFO, p.describe())

    def __deepcopy__(self, memo: dict) -> PlanLog:
        return self
