"""Building blocks shared by networks: MSNLAN's cross-scale attention (cross_scale), RCAN's residual channel
attention blocks (rcab: RCAN, HAN). The convolutions and residual blocks every network uses are model/common.py."""
