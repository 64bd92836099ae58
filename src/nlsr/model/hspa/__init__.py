"""HSPA, the operator of the HSPAN paper: non-local attention with exact sparsemax (soft thresholding).

- module.py: the ``HSPA`` layer (published signature), the non-local embeddings and ``hspa(q, k, v)``, the
  exact operator through the dispatcher;
- dispatch.py: ``plan()``, which algorithm and back-end run when (one table);
- reference.py: the one sparsemax threshold routine, ``soft_threshold`` and the published dense algorithm;
- blocked.py: exact blocked attention without the (L x L) scores (native or torch back-end);
- layer.py: the whole layer as one registered operator (embeddings recomputed in backward);
- export.py: the fixed-shape exact form that torch.onnx.export traces;
- native/: the C kernels and their loader; triton/: the fused Triton kernels and their launcher.

The kernels reach torch as registered operators in the ``nlsr`` namespace (torch.ops.nlsr.hspa_blocked,
hspa_layer, hspa_triton and their ``*_backward``), each with a fake implementation (shapes without data)
and its backward registered, so torch.compile(fullgraph=True) and torch.export see them as single ops.
"""

from nlsr.model.hspa.blocked import hspa_attention
from nlsr.model.hspa.dispatch import IMPLS, Plan, PlanLog, plan
from nlsr.model.hspa.layer import fusable, hspa_layer
from nlsr.model.hspa.module import HSPA, NonLocalEmbeddings, attend, hspa
from nlsr.model.hspa.reference import SoftThreshold, dense_attention, soft_threshold, sparsemax_threshold

__all__ = ['HSPA', 'IMPLS', 'NonLocalEmbeddings', 'Plan', 'PlanLog', 'SoftThreshold', 'attend', 'dense_attention',
           'fusable', 'hspa', 'hspa_attention', 'hspa_layer', 'plan', 'soft_threshold', 'sparsemax_threshold']
