"""Building blocks shared by networks: the cross-scale attention of MSNLAN and CSNLN (cross_scale), CSNLN's
in-scale and cross-scale attentions (csnln_attention), NLSN's sparse attention (sparse_attention), SAN's
second-order attention (second_order), RCAN's residual channel attention blocks (rcab: RCAN, HAN). The
convolutions and residual blocks every network uses are model/common.py."""
