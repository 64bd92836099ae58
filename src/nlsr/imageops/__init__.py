"""Pure image operations: PSNR/SSIM, MATLAB-compatible bicubic resizing, the RGB->Y conversion."""
