"""Benchmark: the published HSPAN x4 exported to ONNX and run by onnxruntime, against PyTorch's default.

Not a test. The network of benchmarks/inference.py's case ``hspan_x4`` (10 groups x 4 LEBs, 192 features,
random weights, seed 0) on Set5's baby at x4 (a 128 x 128 LR image), the whole image in one forward:

* ``pytorch``: the project's default (``--hspa_impl auto``, float32), run by inference.py's worker;
* ``onnxruntime``: the same weights exported by nlsr-export (opset 17), CPUExecutionProvider with its
  default threads.

Each runs in a fresh subprocess (harness.run_case): one forward, whose extra peak memory is VmHWM after a
reset minus the RSS before it (harness.PeakMemory; the onnxruntime session is created before), then
``--repeats`` more (the median is the time).

    python benchmarks/onnx_inference.py --export_only --onnx /tmp/hspan_x4.onnx   # export (not timed)
    python benchmarks/onnx_inference.py --onnx /tmp/hspan_x4.onnx                 # the README table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, PeakMemory, fmt_mib, machine_line, run_case
from inference import CASES, run_pytorch

CASE = 'hspan_x4'


def _export(path: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT / 'src'))
    import nlsr.model as model_pkg
    from nlsr import option
    from nlsr.tools.export import export_onnx
    from nlsr.tools.trained_model import configuration

    args = option.parse(['--cpu', '--test_only', *CASES[CASE][0]])
    torch.manual_seed(0)  # the weights of inference.py's worker
    net = model_pkg.Model(args, log=lambda *_: None).model.eval()
    path.write_bytes(export_onnx(net, configuration(args, net), args.n_colors, args.rgb_range))


def _ort_worker(spec: dict) -> dict:
    import imageio.v3 as imageio
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(spec['onnx'], providers=['CPUExecutionProvider'])
    img = imageio.imread(spec['image'])[..., :3]
    lr = np.ascontiguousarray(img.transpose(2, 0, 1)[None]).astype(np.float32) / 255
    times = []
    with PeakMemory() as peak:
        for _ in range(1 + spec['repeats']):
            t0 = time.perf_counter()
            out = session.run(None, {'lr': lr})[0]
            times.append(time.perf_counter() - t0)
    torch.save(torch.from_numpy(out), spec['save'])
    threads = session.get_session_options().intra_op_num_threads
    return {'time_s': statistics.median(times[1:] or times), 'first_s': times[0],
            'extra_mib': peak.extra_mib, 'threads': threads or 'default'}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--onnx', required=True, help='the exported model (written by --export_only)')
    p.add_argument('--export_only', action='store_true')
    p.add_argument('--repeats', type=int, default=0, help='timed runs after the first (median)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_ort_worker(json.loads(args.worker))))
        return 0
    if args.export_only:
        _export(Path(args.onnx))
        return 0
    import torch

    flags, image = CASES[CASE]
    with tempfile.TemporaryDirectory() as tmp:
        saves = {v: str(Path(tmp) / f'{v}.pt') for v in ('pytorch', 'onnxruntime')}
        results = {'pytorch': run_pytorch({'flags': flags, 'image': str(image), 'mode': 'whole', 'variant': 'project',
                                           'repeats': args.repeats, 'save': saves['pytorch']})}
        spec = {'onnx': args.onnx, 'image': str(image), 'repeats': args.repeats, 'save': saves['onnxruntime']}
        results['onnxruntime'] = run_case(Path(__file__).resolve(), spec, '--onnx', args.onnx)
        if 'error' in results['onnxruntime']:
            print(results['onnxruntime']['error'], file=sys.stderr)
            return 1
        diff = float((torch.load(saves['onnxruntime']) - torch.load(saves['pytorch'])).abs().max())
    print(f'Machine: {machine_line(f"{torch.get_num_threads()} torch threads")}\n')
    print('| variant | threads | time | time ratio | extra peak memory | memory ratio | max abs diff |')
    print('|---|---|---|---|---|---|---|')
    base = results['pytorch']
    for name, r in results.items():
        print(f'| {name} | {r["threads"]} | {r["time_s"]:.2f} s | {r["time_s"] / base["time_s"]:.2f}x | '
              f'{fmt_mib(r["extra_mib"])} | {r["extra_mib"] / base["extra_mib"]:.2f}x | '
              f'{"—" if name == "pytorch" else f"{diff:.1e}"} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
