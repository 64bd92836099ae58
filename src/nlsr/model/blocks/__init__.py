"""Building blocks shared by networks: the tiled patch-wise attention of MSNLAN, CSNLN and PA-EDSR
(cross_scale), PA-EDSR's pyramid attention (pyramid), CSNLN's in-scale and cross-scale attentions
(csnln_attention), NLSN's sparse attention (sparse_attention), SAN's second-order attention (second_order),
RCAN's residual channel attention blocks (rcab: RCAN, HAN). The convolutions and residual blocks every network
uses are model/common.py."""
