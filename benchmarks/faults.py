"""Kill anywhere: SIGKILL short training runs at random moments, resume them, and check the result.

Each trial trains a tiny HSPAN for 3 epochs (3 batches each, CPU), in one process or in two under
`torchrun --max-restarts 2`, and kills it once:
  - at a random time after epoch 1 began (uniform over 0-110% of the uninterrupted run's training time;
    single process: the process; torchrun: one worker, chosen at random), or
  - inside a checkpoint write of a chosen epoch, through SR_FAULT=<file>:<step>:kill (see src/nlsr/fileio.py).
A killed single-process run is resumed with `--load NAME --resume -1` (or started again with --reset when
it died before its first training state); a torchrun job must finish on its own (its restarted worker group
resumes). Then the folder is checked against an uninterrupted run: final weights (single process
bit-identical, torchrun within 1e-6), every file readable, no temporary file left, each epoch's log lines
once, and the loss and PSNR logs continuous (all 3 epochs, equal to the uninterrupted run's).

    python benchmarks/faults.py --trials 40 [--seed 0]

prints one line per trial and a table of the kill points covered (Markdown, for benchmarks/README.md).
Exit status 1 when any trial failed. The runs and checks are tests/training/faults_harness.py's, which
tests/training/test_faults.py drives at decisive points.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / 'tests'), str(ROOT / 'tests' / 'training')]
from faults_harness import CHECKPOINT_FILES, EPOCHS, STEPS, check, make_world, recover, reference_run, run  # noqa: E402


def trial(world: dict, name: str, ddp: bool, point: tuple, duration: float, reference: Path,
          rng: random.Random) -> dict:
    """One kill and its recovery. point: ('time',) or ('write', file, step, epoch)."""
    folder = world['exp'] / name
    argv = ['--save', name, '--reset', '--epochs', str(EPOCHS)]
    fault = ''
    if point[0] == 'write':
        _, file, step, epoch = point
        fault = f'{file}:{step}:kill'
        if epoch > 1:  # the epochs before it run normally; the faulty write is the next run's first
            rc, out, _, _ = run(world, ['--save', name, '--reset', '--epochs', str(epoch - 1)], ddp)
            if rc != 0:
                return {'name': name, 'ddp': ddp, 'point': point, 'problems': [f'prefix run failed: {out[-500:]}']}
            argv = ['--load', name, '--resume', '-1', '--epochs', str(EPOCHS)]
        rc, out, killed, _ = run(world, argv, ddp, fault=fault)
        where = f'{file} {step} (epoch {epoch})'
    else:
        rc, out, killed, _ = run(world, argv, ddp, kill_after=rng.uniform(0.0, 1.1) * duration, rng=rng)
        where = killed or 'finished first'
    problems = []
    if 'HUNG' in out:
        problems.append('hung')
    if ddp:
        if rc != 0:
            problems.append(f'torchrun job did not complete on its own (exit {rc}): {out[-800:]}')
    elif rc == 0 and killed:
        problems.append('killed run exited 0')
    elif rc != 0 or killed:
        for _ in range(3):  # a resume that is itself clean finishes the first time
            rc, out = recover(world, name, ddp)
            if rc == 0:
                break
        if rc != 0:
            problems.append(f'resume failed (exit {rc}): {out[-800:]}')
    if not problems:
        problems = check(folder, reference, ddp)
    return {'name': name, 'ddp': ddp, 'point': point, 'where': where, 'killed': bool(killed) or bool(fault),
            'problems': problems}


def plan(trials: int, rng: random.Random) -> list[tuple[bool, tuple]]:
    """Half single-process, half torchrun; in each, alternately a timed kill and a write fault."""
    out = []
    for i in range(trials):
        ddp = i % 2 == 1
        if (i // 2) % 2 == 0:
            out.append((ddp, ('time',)))
        else:
            out.append((ddp, ('write', rng.choice(CHECKPOINT_FILES), rng.choice(STEPS), rng.randint(1, EPOCHS))))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--trials', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--dir', type=str, default='', help='work folder (default: a temporary one)')
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix='faults-'))
    world = make_world(base)
    t0 = time.perf_counter()
    ref_single, t_single = reference_run(world, ddp=False)
    ref_ddp, t_ddp = reference_run(world, ddp=True)
    print(f'uninterrupted runs train for {t_single:.1f} s (1 process), {t_ddp:.1f} s (torchrun, 2 processes) '
          'from the start of epoch 1; timed kills fall uniformly in 0-110% of that', flush=True)
    results = []
    for i, (ddp, point) in enumerate(plan(args.trials, rng)):
        r = trial(world, f'trial{i}', ddp, point, t_ddp if ddp else t_single, ref_ddp if ddp else ref_single, rng)
        results.append(r)
        status = 'ok' if not r['problems'] else 'FAIL: ' + '; '.join(r['problems'])
        print(f'{i:3d} {"torchrun" if ddp else "single  "} {r.get("where", "")!s:38} {status}', flush=True)
    failures = sum(bool(r['problems']) for r in results)
    print(f'\n{len(results)} trials, {failures} failures, {time.perf_counter() - t0:.0f} s\n')
    table = Counter((('torchrun' if r['ddp'] else 'single'), 'write fault' if r['point'][0] == 'write'
                     else 'timed SIGKILL', r.get('where', '?'), 'ok' if not r['problems'] else 'FAIL')
                    for r in results)
    print('| run | kill | point | trials | result |\n|---|---|---|---|---|')
    for (mode, kind, where, ok), n in sorted(table.items()):
        print(f'| {mode} | {kind} | {where} | {n} | {ok} |')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
