"""ONNX export of a trained network, checked by onnxruntime.

`nlsr-export --pre_train MODEL OUT.onnx [architecture flags]` traces the network at a small sample
size with dynamic batch, height and width (TorchScript exporter, opset 17). HSPA is exported as its exact
fixed-shape form (model.hspa.export: top-k threshold then Michelot, query blocks in an ONNX Loop) and MSNLAN's
attention as one batched computation, so the graph is exact at every size. The model's configuration goes into
the ONNX metadata (`sr_config`, JSON, as in a .safetensors model file, plus `model`, `scale`, `rgb_range`,
`n_colors`). The file is then run by onnxruntime (CPU) on an input of another size, odd height and width, and
the largest difference from the PyTorch forward is printed.

Input: float32 (N, n_colors, H, W) on 0..rgb_range; output (N, n_colors, scale H, scale W).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nlsr.cli import ArgumentParser, run_command
from nlsr.errors import UserError
from nlsr.fileio import atomic_write_bytes
from nlsr.model.contract import SRNetwork
from nlsr.tools.trained_model import configuration, load_network, model_args

OPSET = 17
SAMPLE_SIZE = 24  # LR height and width of the traced sample (the graph's sizes are dynamic)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog='nlsr-export', description='Export a trained network to ONNX (dynamic batch, height and width) and '
        'check it with onnxruntime. Other flags are main.py architecture flags, for published checkpoints.')
    p.add_argument('out', help='the .onnx file to write')
    p.add_argument('--pre_train', default='', help='model file (.pt or .safetensors); none for --model Bicubic')
    p.add_argument('--opset', type=int, default=OPSET, help='ONNX opset version')
    p.add_argument('--sample_size', type=int, default=SAMPLE_SIZE, help='LR size of the traced sample')
    p.add_argument('--no_check', action='store_true', help='skip the onnxruntime check')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for user errors')
    return p


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed: pip install 'nlsr[export]' (in a checkout: -r "
                        'requirements-export.txt)') from None


def export_onnx(net: SRNetwork, config: dict, n_colors: int, rgb_range: float, sample_size: int = SAMPLE_SIZE,
                opset: int = OPSET) -> bytes:
    """The serialized ONNX model of `net` (eval mode, CPU) with dynamic batch, height and width and the
    configuration in its metadata."""
    import onnx

    sample = torch.rand(1, n_colors, sample_size, sample_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (deprecated in favour of torch.export, which needs onnxscript and
        # cannot keep the query-block loop dynamic) and its tracer warnings: expected, not the user's concern.
        warnings.simplefilter('ignore')
        torch.onnx.export(net, (sample * rgb_range,), buffer, dynamo=False, opset_version=opset,
                          input_names=['lr'], output_names=['sr'],
                          dynamic_axes={'lr': {0: 'batch', 2: 'height', 3: 'width'},
                                        'sr': {0: 'batch', 2: 'sr_height', 3: 'sr_width'}})
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {'sr_config': json.dumps(config), 'model': str(config['model']), 'scale': str(config['scale']),
            'rgb_range': str(rgb_range), 'n_colors': str(n_colors)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run_onnx(model: bytes | str, lr: np.ndarray) -> np.ndarray:
    """onnxruntime's (CPU) output for one float32 NCHW input."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=['CPUExecutionProvider'])
    return session.run(None, {'lr': lr.astype(np.float32)})[0]


def check(net: SRNetwork, model: bytes, n_colors: int, rgb_range: float, size: tuple[int, int]) -> float:
    """Largest absolute difference between onnxruntime and the PyTorch forward on a random input of `size`."""
    lr = torch.rand(1, n_colors, *size, generator=torch.Generator().manual_seed(1)) * rgb_range
    with torch.no_grad():
        expected = net(lr).numpy()
    got = run_onnx(model, lr.numpy())
    if got.shape != expected.shape:
        raise RuntimeError(f'onnxruntime output shape {got.shape}, PyTorch {expected.shape}')
    return float(np.abs(got - expected).max())


def run(argv: Sequence[str]) -> None:
    args, flags = build_parser().parse_known_args(argv)
    if not args.out.endswith('.onnx'):
        raise UserError(f'{args.out}: expected an output file name ending in .onnx')
    if args.sample_size < 8:
        raise UserError(f'--sample_size {args.sample_size}: expected at least 8')
    _require('onnx')
    _require('onnxruntime')
    margs = model_args(args.pre_train, flags, ['--cpu'])
    net = load_network(margs)
    if net.export_refusal:
        raise UserError(f'--pre_train {args.pre_train}: {type(net).__name__} cannot be exported to ONNX '
                        f'({net.export_refusal})')
    config = configuration(margs, net)
    start = time.perf_counter()
    data = export_onnx(net, config, margs.n_colors, margs.rgb_range, args.sample_size, args.opset)
    atomic_write_bytes(Path(args.out), data)
    print(f'{args.out}: {config["model"]} x{config["scale"]} exported (opset {args.opset}, dynamic batch, height '
          f'and width; {len(data) / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)')
    if not args.no_check:
        size = (args.sample_size + 5, args.sample_size + 3)
        diff = check(net, data, margs.n_colors, margs.rgb_range, size)
        print(f'onnxruntime check at {size[0]}x{size[1]} (export {args.sample_size}x{args.sample_size}): '
              f'max |onnx - torch| = {diff:.3g} (rgb_range {margs.rgb_range})')


def main(argv: Sequence[str] | None = None) -> int:
    """The `nlsr-export` command: run() through the one bootstrap (cli.run_command); the exit status."""
    return run_command(run, argv)


if __name__ == '__main__':
    sys.exit(main())
