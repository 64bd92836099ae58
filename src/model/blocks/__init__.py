"""Building blocks of the non-local networks: MSNLAN's cross-scale attention (cross_scale) and CSNLN's
in-scale and cross-scale attentions (csnln_attention). The convolutions and residual blocks every network
uses are model/common.py."""
