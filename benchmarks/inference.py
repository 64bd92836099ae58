"""Benchmark: whole-network inference on one real LR image, the published algorithm vs the project.

Not a test. For each case (network, image) and mode (``--chop`` as the published tests run, or the
whole image in one forward) it runs, each in a fresh subprocess, with the same random weights:

* ``published``: the published algorithm, reimplemented here: every HSPA layer forms the whole (L x L)
  score matrix and thresholds it the published way (top-k, the 2k retry; benchmarks/hspa.py), MSNLAN's
  attention forms its whole score matrices, NCHW float32; chop is the published forward_chop (the
  project's, which tests/test_model_test_time.py checks against the published outputs);
* ``project``: the project's defaults (``--hspa_impl auto``, float32);
* ``project bf16``: the same with ``--precision bf16`` (where the option exists).

Each subprocess builds the model, loads the image, resets the peak-RSS counter
(/proc/self/clear_refs "5"), runs the forward once (its extra peak memory: VmHWM - RSS before), then
``--repeats`` more times (the median is the time). Outputs are compared with the published variant's.

    python benchmarks/inference.py                      # the README table
    python benchmarks/inference.py --cases hspan_x4 --modes whole --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SET5 = ROOT / 'datasets' / 'benchmark' / 'Set5' / 'LR_bicubic'
HSPAN_FLAGS = ['--model', 'HSPAN', '--n_resgroups', '10', '--n_resblocks', '4', '--n_feats', '192',
               '--reduction', '2', '--topk', '128', '--res_scale', '0.1', '--rgb_range', '1']
# name: (flags, LR image). The published configurations; Set5 baby (x4, 128x128) and butterfly (x2, 128x128).
CASES = {
    'hspan_x4': ([*HSPAN_FLAGS, '--scale', '4'], SET5 / 'X4' / 'img_001x4.png'),
    'hspan_x2': ([*HSPAN_FLAGS, '--scale', '2'], SET5 / 'X2' / 'img_003x2.png'),
    'msnlan_x4': (['--template', 'MSNLAN', '--scale', '4'], SET5 / 'X4' / 'img_001x4.png'),
}


def _published_hspa(layer, st) -> None:
    """Make one HSPA layer run the published dense algorithm."""
    import torch

    def forward(x):
        q, k, v = layer.embed(x)
        return layer.combine(torch.bmm(st.apply(torch.bmm(q, k.transpose(1, 2)), layer.topk), v), x)

    layer.forward = forward


def _worker(spec: dict) -> dict:
    import imageio.v3 as imageio
    import numpy as np
    import torch

    sys.path[:0] = [str(ROOT / 'src'), str(ROOT / 'benchmarks')]
    import model as model_pkg
    import option
    from hspa import _published_st_function, _reset_peak, _rss_kib
    from model.attention import HSPA
    from model.networks.msnlan import CrossScaleAttention

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
        st = _published_st_function()
        for module in wrapper.modules():
            if isinstance(module, HSPA):
                _published_hspa(module, st)
            if isinstance(module, CrossScaleAttention):
                module.impl = 'dense'   # MSNLAN: the published whole score matrices
    img = imageio.imread(spec['image'])[..., :3]
    lr = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    before = _rss_kib('VmRSS')
    _reset_peak()
    times = []
    with torch.no_grad():
        for _ in range(1 + spec['repeats']):
            t0 = time.perf_counter()
            out = wrapper(lr)
            times.append(time.perf_counter() - t0)
    peak = _rss_kib('VmHWM')
    torch.save(out, spec['save'])
    return {'time_s': statistics.median(times[1:] or times), 'first_s': times[0],
            'extra_mib': (peak - before) / 1024, 'threads': torch.get_num_threads()}


def _run(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x: float | None) -> str:
    return '—' if x is None else (f'{x / 1024:.2f} GiB' if x >= 1024 else f'{x:.0f} MiB')


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

    from hspa import _machine  # benchmarks/ is the script's folder, first on sys.path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            flags, image = CASES[case]
            for mode in args.modes:
                results = {}
                for variant in args.variants:
                    save = str(Path(tmp) / f'{case}-{mode}-{variant.replace(" ", "_")}.pt')
                    results[variant] = _run({'flags': flags, 'image': str(image), 'mode': mode, 'variant': variant,
                                             'repeats': args.repeats, 'save': save})
                    if 'error' not in results[variant] and variant != 'published' and 'published' in results \
                            and 'error' not in results['published']:
                        ref = torch.load(str(Path(tmp) / f'{case}-{mode}-published.pt'))
                        results[variant]['max_diff'] = float((torch.load(save) - ref).abs().max())
                    print(f'# {case} {mode} {variant}: {results[variant]}', file=sys.stderr, flush=True)
                rows.append((case, mode, image.name, results))
    print(f'Machine: {_machine(torch.get_num_threads(), None, None)}\n')
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
                  f'{_mib(r["extra_mib"])} | {mem} | {diff} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
