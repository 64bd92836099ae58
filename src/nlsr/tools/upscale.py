"""Super-resolve people's images with a trained model file: `nlsr-upscale --pre_train MODEL IN [IN ...]
--out DIR`.

The model file describes its network (no architecture flags). Each image goes through the network whole
(`--tile N`: N x N LR tiles, blended as main.py's --tile), at --precision, on CUDA when available
(`--cpu` to stay on the CPU), and is written as DIR/<name>.png:

- colour is quantised like main.py's results (x * 255 / rgb_range, clamped, rounded), so an 8-bit RGB
  image gives the same PNG as `main.py --test_only --save_results`;
- 16-bit images are fed at full precision and written as 16-bit PNGs;
- grayscale images go through the network as three equal channels and come back as grayscale (BT.601
  luma of the output);
- an alpha channel is upscaled with bicubic interpolation (MATLAB's imresize), as chaiNNer does;
- EXIF orientation is applied on reading.
- a network with random draws (NLSN) takes them, per image, from --seed and the file name (without
  suffix), as main.py's evaluation does for the files it names (a benchmark set names an image by its HR file);
- a model file serving several scales (MDSR) upscales by `--scale`.

A file that cannot be read or written costs one line naming it; the others go on (exit status 1 then).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nlsr import model
from nlsr.cli import ArgumentParser, run_command
from nlsr.errors import UserError
from nlsr.imageops.imresize import imresize
from nlsr.imageops.metrics import tensor_to_image
from nlsr.tools.images import IMAGE_SUFFIXES, read_image, write_png
from nlsr.tools.trained_model import model_args, require_configuration
from nlsr.training.seeding import image_seed

LUMA = (0.299, 0.587, 0.114)  # BT.601, what Pillow and OpenCV use for RGB -> gray


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='nlsr-upscale', description='Super-resolve images with a trained model file.')
    p.add_argument('inputs', nargs='+', help='image files or folders of images')
    p.add_argument('--pre_train', required=True, help='model file written by main.py (.pt or .safetensors)')
    p.add_argument('--out', required=True, help='folder for the results (<name>.png)')
    p.add_argument('--tile', type=int, default=0, help='LR tile size (0: the whole image at once)')
    p.add_argument('--tile_overlap', type=int, default=16, help='LR overlap between tiles')
    p.add_argument('--precision', default='single', choices=('single', 'half', 'bf16'),
                   help='half: float16 weights (CUDA); bf16: bfloat16 convolutions')
    p.add_argument('--cpu', action='store_true', help='use the CPU even when CUDA is available')
    p.add_argument('--scale', type=int, default=None,
                   help="the scale to upscale by, for a model file serving several (MDSR); default: the model's")
    p.add_argument('--seed', type=int, default=1,
                   help="seed of a network's random draws (NLSN), per image with its file name, as main.py's")
    p.add_argument('--debug', action='store_true', help='show full tracebacks for user errors')
    return p


def collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The image files named or found (not recursively) in the folders named, and one message per input
    that is neither."""
    files, problems = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f'{path}: no such file or folder')
    return files, problems


def _to_tensor(pixels: np.ndarray, rgb_range: float) -> torch.Tensor:
    """HxWxC integer pixels -> float32 (1, C, H, W) on 0..rgb_range (data.common.to_tensor's arithmetic)."""
    peak = 65535 if pixels.dtype == np.uint16 else 255
    t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()
    return t.mul_(rgb_range / peak)[None]


def _quantize(sr: torch.Tensor, rgb_range: float, sixteen_bit: bool) -> np.ndarray:
    """(1, C, H, W) on 0..rgb_range -> HxWxC uint8 (main.py's quantisation) or uint16."""
    if not sixteen_bit:
        return tensor_to_image(sr, rgb_range)
    x = sr[0].detach().to('cpu', torch.float32).mul(65535 / rgb_range).clamp(0, 65535).round()
    return x.numpy().astype(np.uint16).transpose(1, 2, 0)


def _upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Alpha (HxW uint8 or uint16) upscaled by MATLAB's bicubic imresize, rounded and clipped."""
    if alpha.dtype == np.uint8:
        return imresize(alpha, scale=scale)
    return np.clip(np.round(imresize(alpha.astype(np.float64), scale=scale)), 0, 65535).astype(np.uint16)


def upscale_pixels(net: model.Model, pixels: np.ndarray, n_colors: int, rgb_range: float, scale: int,
                   seed: int | None = None, idx_scale: int = 0) -> np.ndarray:
    """The super-resolved image of HxWxC pixels (C 1 to 4), in the same layout and bit depth; `seed`: the
    seed of a network's random draws (None: the model's --seed); `idx_scale`: which of the model's scales."""
    gray = pixels.shape[2] <= 2
    colour = pixels[..., :1] if gray else pixels[..., :3]
    if n_colors == 3 and gray:
        colour = np.repeat(colour, 3, axis=2)
    elif n_colors == 1 and not gray:
        raise UserError('the model works on one channel (--n_colors 1): give grayscale images')
    with torch.no_grad():
        sr = net(_to_tensor(colour, rgb_range).to(net.device), idx_scale, seed=seed).float()
    if gray and n_colors == 3:
        sr = (sr * torch.tensor(LUMA, dtype=sr.dtype, device=sr.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    out = _quantize(sr, rgb_range, pixels.dtype == np.uint16)
    if pixels.shape[2] in (2, 4):
        out = np.concatenate([out, _upscale_alpha(pixels[..., -1], scale)[..., None]], axis=2)
    return out


def chosen_scale(scales: Sequence[int], given: int | None) -> int:
    """The index of --scale among the model's scales (the only one when not given); UserError otherwise."""
    listed = ', '.join(f'x{s}' for s in scales)
    if given is None:
        if len(scales) > 1:
            raise UserError(f'--scale: the model file serves {listed}; choose one')
        return 0
    if given not in scales:
        raise UserError(f'--scale {given}: the model file serves {listed}')
    return list(scales).index(given)


def run(argv: Sequence[str]) -> int:
    """Upscale every image; returns the exit status (1 when some input could not be done)."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    require_configuration(args.pre_train)
    device_flags = ['--tile', str(args.tile), '--tile_overlap', str(args.tile_overlap), '--precision', args.precision,
                    '--seed', str(args.seed)]
    margs = model_args(args.pre_train, (), device_flags + (['--cpu'] if args.cpu else []))
    idx_scale = chosen_scale(margs.scale, args.scale)
    net = model.Model(margs, log=lambda line: print(line, file=sys.stderr))
    net.eval()
    scale, out_dir = margs.scale[idx_scale], Path(args.out)
    files, problems = collect_images(args.inputs)
    for line in problems:
        print(f'error: {line}', file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[Path, Path] = {}
    for path in tqdm(files, unit='image', disable=None, file=sys.stderr):
        target = out_dir / f'{path.stem}.png'
        try:
            if target in written:
                raise UserError(f'{path}: same output name {target} as {written[target]}; skipped')
            pixels = read_image(path)
            try:
                result = upscale_pixels(net, pixels, margs.n_colors, margs.rgb_range, scale,
                                        image_seed(margs.seed, path.stem), idx_scale)
            except UserError as e:
                raise UserError(f'{path}: {e}') from None
            write_png(target, result)
            written[target] = path
        except (UserError, OSError) as e:
            problems.append(str(e))
            tqdm.write(f'error: {e}', file=sys.stderr)
    print(f'{len(written)} of {len(files)} images written to {out_dir} (x{scale}, {margs.model})')
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `nlsr-upscale` command: run() through the one bootstrap (cli.run_command); the exit status."""
    return run_command(run, argv)


if __name__ == '__main__':
    sys.exit(main())
