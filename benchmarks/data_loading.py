"""Training-patch throughput of the data pipeline: `--ext img` (decode PNGs per sample) vs `sep` (.npy cache).

    python benchmarks/data_loading.py                    # T91+BSD200 from ../shared/data/train, x2, patch 96
    python benchmarks/data_loading.py --batches 100 --workers 2

The cache goes to a temporary folder (`args.dir_cache`), never into the dataset folder. Cache building
(LR made from HR, and for `sep` the decoded HR/LR) is timed separately; throughput is measured after the
first batch, so worker start-up is not counted. Prints a Markdown table and the machine line (harness).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, machine_line


def run(ext: str, dir_data: Path, cache_dir: Path, workers: int, batches: int, batch_size: int,
        patch: int, scale: int) -> dict:
    from nlsr import data, option

    args = option.parse(['--data_train', 'T91+BSD200', '--data_test', 'T91', '--dir_data', str(dir_data),
                         '--ext', ext, '--scale', str(scale), '--patch_size', str(patch), '--cpu',
                         '--n_threads', str(workers), '--batch_size', str(batch_size),
                         '--test_every', str(batches + 1), '--dir_cache', str(cache_dir)])
    t0 = time.perf_counter()
    train = data.TrainSet([data.make_dataset(n, args, train=True, log=lambda _m: None) for n in ('T91', 'BSD200')])
    sampler = data.PatchBatchSampler(len(train), batch_size, batches + 1, 1, seed=1)
    loader = data.SRLoader(train, batch_sampler=sampler, num_workers=min(workers, os.cpu_count() or 1))
    prep = time.perf_counter() - t0
    it = iter(loader)
    next(it)  # worker start-up and first batch excluded
    t1 = time.perf_counter()
    n = 0
    for _lr, hr, _ in it:
        n += hr.shape[0]
    elapsed = time.perf_counter() - t1
    return {'ext': ext, 'prep': prep, 'patches': n, 'seconds': elapsed, 'rate': n / elapsed,
            'workers': loader.num_workers, 'images': len(train.datasets[0].hr_files) + len(train.datasets[1].hr_files)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dir_data', default=str(ROOT.parent / 'shared' / 'data' / 'train'))
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batches', type=int, default=60, help='timed batches per mode')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--patch_size', type=int, default=96)
    p.add_argument('--scale', type=int, default=2)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / 'src'))
    os.environ.setdefault('OMP_NUM_THREADS', '1')

    rows = []
    with tempfile.TemporaryDirectory(prefix='sr-cache-') as tmp:
        for ext in ('img', 'sep'):
            # The first 'img' run also makes and caches the LR images; 'sep' then adds the decoded HR.
            rows.append(run(ext, Path(a.dir_data), Path(tmp), a.workers, a.batches, a.batch_size,
                            a.patch_size, a.scale))
    print(f'T91+BSD200 ({rows[0]["images"]} images >= patch), x{a.scale}, HR patch {a.patch_size}, '
          f'batch {a.batch_size}, {rows[0]["workers"]} workers, {a.batches} timed batches\n')
    print('| --ext | patches/s | timed patches | cache build before the run (s) |')
    print('|---|---|---|---|')
    for r in rows:
        print(f'| {r["ext"]} | {r["rate"]:.0f} | {r["patches"]} | {r["prep"]:.1f} |')
    print(f'\nMachine: {machine_line()} (after the run)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
