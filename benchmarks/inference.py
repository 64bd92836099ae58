"""Benchmark: whole-network inference on one real LR image, the published algorithm vs the project.

Not a test. For each case (network, image) and mode (``--chop`` as the published tests run, or the
whole image in one forward) it runs, each in a fresh subprocess, with the same random weights:

* ``published``: the published algorithm, reimplemented here: every HSPA layer forms the whole (L x L)
  score matrix and thresholds it the published way (top-k, the 2k retry; harness.published_attention), MSNLAN's
  attention forms its whole score matrices, NCHW float32; chop is the published forward_chop (the
  project's, which tests/test_model_test_time.py checks against the published outputs);
* ``project``: the project's defaults (``--hspa_impl auto``, float32);
* ``project bf16``: the same with ``--precision bf16`` (where the option exists).

Each subprocess (harness.run_case) builds the model, loads the image and runs the forward once, then
``--repeats`` more times (the median is the time), under harness.PeakMemory (extra peak memory: VmHWM
after a reset minus the RSS before). Outputs are compared with the published variant's.

    python benchmarks/inference.py                      # the README table
    python benchmarks/inference.py --cases hspan_x4 --modes whole --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, PeakMemory, fmt_mib, machine_line, published_attention, run_case

SET5 = ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic'
HSPAN_FLAGS = ['--model', 'HSPAN', '--n_resgroups', '10', '--n_resblocks', '4', '--n_feats', '192',
               '--reduction', '2', '--topk', '128', '--res_scale', '0.1', '--rgb_range', '1']
# name: (flags, LR image). The published configurations; Set5 baby (x4, 128x128) and butterfly (x2, 128x128).
CASES = {
    'hspan_x4': ([*HSPAN_FLAGS, '--scale', '4'], SET5 / 'X4' / 'img_001x4.png'),
    'hspan_x2': ([*HSPAN_FLAGS, '--scale', '2'], SET5 / 'X2' / 'img_003x2.png'),
    'msnlan_x4': (['--template', 'MSNLAN', '--scale', '4'], SET5 / 'X4' / 'img_001x4.png'),
}


def _published_hspa(layer) -> None:
    """Make one HSPA layer run the published dense algorithm."""

    def forward(x):
        return layer.combine(published_attention(*layer.embed(x), layer.topk), x)

    layer.forward = forward


def _worker(spec: dict) -> dict:
    import imageio.v3 as imageio
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / 'src'))
    import nlsr.model as model_pkg
    from nlsr import option
    from nlsr.model.attention import HSPA
    from nlsr.model.networks.msnlan import CrossScaleAttention

    flags = ['--cpu', '--test_only', *spec['flags']]
    if spec['mode'] == 'chop':
        flags.append('--chop')
    elif '--template' in flags:
        flags.append('--no_chop')
    if spec['variant'] == 'project bf16':
        flags += ['--precision', 'bf16']
    if spec['variant'] == 'published' and 'HSPAN' in flags:
        flags += ['--hspa_impl', 'dense']
    args = option.parse(flags)
    torch.manual_seed(0)
    wrapper = model_pkg.Model(args, log=lambda *_: None).eval()
    if spec['variant'] == 'published':
        for module in wrapper.modules():
            if isinstance(module, HSPA):
                _published_hspa(module)
            if isinstance(module, CrossScaleAttention):
                module.impl = 'dense'   # MSNLAN: the published whole score matrices
    img = imageio.imread(spec['image'])[..., :3]
    lr = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    times = []
    with PeakMemory() as peak, torch.no_grad():
        for _ in range(1 + spec['repeats']):
            t0 = time.perf_counter()
            out = wrapper(lr)
            times.append(time.perf_counter() - t0)
    torch.save(out, spec['save'])
    return {'time_s': statistics.median(times[1:] or times), 'first_s': times[0],
            'extra_mib': peak.extra_mib, 'threads': torch.get_num_threads()}


def run_pytorch(spec: dict) -> dict:
    """One case (flags, image, mode, variant, repeats, save) in a fresh process: time, extra peak memory."""
    return run_case(Path(__file__).resolve(), spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', nargs='*', default=list(CASES), choices=list(CASES))
    p.add_argument('--modes', nargs='*', default=['chop', 'whole'], choices=['chop', 'whole'])
    p.add_argument('--variants', nargs='*', default=['published', 'project', 'project bf16'])
    p.add_argument('--repeats', type=int, default=1, help='timed runs after the first (median)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            flags, image = CASES[case]
            for mode in args.modes:
                results = {}
                for variant in args.variants:
                    save = str(Path(tmp) / f'{case}-{mode}-{variant.replace(" ", "_")}.pt')
                    results[variant] = run_pytorch({'flags': flags, 'image': str(image), 'mode': mode,
                                                    'variant': variant, 'repeats': args.repeats, 'save': save})
                    if 'error' not in results[variant] and variant != 'published' and 'published' in results \
                            and 'error' not in results['published']:
                        ref = torch.load(str(Path(tmp) / f'{case}-{mode}-published.pt'))
                        results[variant]['max_diff'] = float((torch.load(save) - ref).abs().max())
                    print(f'# {case} {mode} {variant}: {results[variant]}', file=sys.stderr, flush=True)
                rows.append((case, mode, image.name, results))
    print(f'Machine: {machine_line(f"{torch.get_num_threads()} torch threads per run")}\n')
    print('| case | image | mode | variant | time | speed-up | extra peak memory | memory ratio | max abs diff |')
    print('|---|---|---|---|---|---|---|---|---|')
    for case, mode, image, results in rows:
        base = results.get('published', {})
        for variant, r in results.items():
            if 'error' in r:
                print(f'| {case} | {image} | {mode} | {variant} | failed: {r["error"]} | | | | |')
                continue
            speed = f'{base["time_s"] / r["time_s"]:.1f}x' if 'time_s' in base else '—'
            mem = f'{base["extra_mib"] / r["extra_mib"]:.1f}x' if 'extra_mib' in base and r['extra_mib'] > 0 else '—'
            diff = f'{r["max_diff"]:.1e}' if 'max_diff' in r else '—'
            print(f'| {case} | {image} | {mode} | {variant} | {r["time_s"]:.2f} s | {speed} | '
                  f'{fmt_mib(r["extra_mib"])} | {mem} | {diff} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
