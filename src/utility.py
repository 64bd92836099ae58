"""Experiment folder (logs, plots, result images, results.json), timers and seeding.

Everything a run writes lives in experiment/<save>/ (or experiment/<load>/ when continuing) at the
repository root, whatever the working directory; SR_EXPERIMENT_ROOT overrides that root (tests use it).
Only the main process writes (see `is_main_process`), so a distributed run logs each line once.

Distributed runs (torchrun, env://): `init_distributed` / `destroy_distributed` and thin wrappers over
torch.distributed's own collectives that degrade to the identity in a single process, so the trainer has one
code path. Rank 0 is the only process that reads or writes the experiment folder; the others receive what it
read (resume state, folder checks) through broadcasts, so several machines need not share that folder.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import UserError
from fileio import atomic_torch_save, atomic_write_bytes, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
# The commit record of a training run: written last at every checkpoint, read on resume.
STATE_FILE = 'optimizer.pt'


def experiment_root() -> Path:
    """<repo>/experiment, or $SR_EXPERIMENT_ROOT when set."""
    override = os.environ.get('SR_EXPERIMENT_ROOT')
    return Path(override).resolve() if override else REPO_ROOT / 'experiment'


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised torch.distributed group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


# ================================================================== torch.distributed
# Variables torchrun (and torch.distributed.launch) sets for every worker; env:// reads MASTER_ADDR/PORT too.
TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
# Per-rank seeds: rank r adds r * RANK_SEED_STRIDE, so rank 0 draws exactly what a single process draws.
RANK_SEED_STRIDE = 1_000_003


class RankZeroError(UserError):
    """A UserError that every process raises alike (decided by the flags or broadcast by rank 0): main()
    prints it on rank 0 only, so a torchrun job reports it once."""

    rank_zero_only = True


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str = ''


def torchrun_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun, or None when the process was not started by it."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in TORCHRUN_VARS):
        return None
    try:
        rank, world, local = (int(env[k]) for k in TORCHRUN_VARS)
    except ValueError:
        raise UserError('RANK/WORLD_SIZE/LOCAL_RANK: expected integers (start the job with torchrun)') from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f'RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: inconsistent torchrun variables')
    return DistEnv(rank, world, local)


def uses_cuda(args: argparse.Namespace) -> bool:
    """The device rule of model.Model: CUDA unless --cpu or no CUDA device is visible."""
    return not getattr(args, 'cpu', False) and torch.cuda.is_available()


def check_distributed_args(args: argparse.Namespace, env: DistEnv) -> None:
    """Flag combinations a torchrun job cannot run, refused alike by every process before any collective."""
    n_gpus = int(getattr(args, 'n_GPUs', 1) or 1)
    if n_gpus > 1:
        raise RankZeroError(f'--n_GPUs {n_gpus} is DataParallel inside one process and cannot be combined with '
                            'torchrun: drop --n_GPUs and start one process per GPU (--nproc_per_node)')
    if args.batch_size % env.world_size:
        raise RankZeroError(f'--batch_size {args.batch_size} is the global batch: it must be divisible by the '
                            f'{env.world_size} torchrun processes (WORLD_SIZE)')
    if not args.test_only and 'GAN' in str(getattr(args, 'loss', '')).upper():
        import loss

        if any(t.name == 'GAN' for t in loss.parse_loss(args.loss)):
            raise RankZeroError(f'--loss {args.loss}: the GAN term trains its own discriminator per process, '
                                'which torchrun would let drift apart; train it in a single process')
    if uses_cuda(args) and env.local_rank >= torch.cuda.device_count():
        raise RankZeroError(f'LOCAL_RANK {env.local_rank}: only {torch.cuda.device_count()} CUDA devices are '
                            'visible on this machine (lower --nproc_per_node, or use --cpu)')


def init_distributed(args: argparse.Namespace) -> DistEnv | None:
    """Join the torchrun job (env://): nccl on cuda:LOCAL_RANK, gloo with --cpu or without CUDA.

    None in a plain `python main.py` run. Checks the flags first, so a bad combination fails the same way
    on every process without waiting for a rendezvous.
    """
    env = torchrun_env()
    if env is None:
        return None
    check_distributed_args(args, env)
    import torch.distributed as dist

    if uses_cuda(args):
        device = torch.device('cuda', env.local_rank)
        torch.cuda.set_device(device)  # object collectives and NCCL use the current device
        dist.init_process_group('nccl', init_method='env://', device_id=device)
    else:
        dist.init_process_group('gloo', init_method='env://')
    return DistEnv(env.rank, env.world_size, env.local_rank, dist.get_backend())


def destroy_distributed() -> None:
    """Leave the process group, if any (called on success and on errors alike)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank` (rank 0 keeps `seed`, so it draws what a single process draws)."""
    return seed + RANK_SEED_STRIDE * rank


def barrier() -> None:
    if get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every process (pickled; keep it small or on the CPU)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0; None on the other ranks."""
    world = get_world_size()
    if world == 1:
        return [obj]
    rank = get_rank()
    out: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean(values: Sequence[float], device: torch.device) -> list[float]:
    """The mean over processes of each value (float64 on `device`: the backend's device)."""
    if get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return (t / get_world_size()).tolist()


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank `src`'s copy."""
    if get_world_size() == 1:
        return
    for t in tensors:
        torch.distributed.broadcast(t, src=src)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run and its resumed twin draw the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Timer:
    """Wall-clock stopwatch: toc() reads, hold()/release() accumulate intervals."""

    def __init__(self) -> None:
        self.acc = 0.0
        self.t0 = time.perf_counter()

    def tic(self) -> None:
        self.t0 = time.perf_counter()

    def toc(self, restart: bool = False) -> float:
        now = time.perf_counter()
        diff = now - self.t0
        if restart:
            self.t0 = now
        return diff

    def hold(self) -> None:
        self.acc += self.toc()

    def release(self) -> float:
        acc, self.acc = self.acc, 0.0
        return acc


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW or HxWxC image (C=1 is written as grayscale)."""
    import imageio.v3 as iio

    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return iio.imwrite('<bytes>', img, extension='.png')


class Checkpoint:
    """The experiment folder of one run: paths, the log, config.txt, images, results.json and plots.

    It only writes; what goes into a checkpoint and how a run resumes is the Trainer's business.
    """

    def __init__(self, args: argparse.Namespace, root: str | os.PathLike | None = None,
                 is_main: bool | None = None) -> None:
        self.args = args
        self.is_main = is_main_process() if is_main is None else is_main
        name = args.load or args.save
        if not name or Path(name).name != name or name in ('.', '..'):
            raise UserError(f'--save/--load {name!r}: expected a plain folder name (experiment/<name>/)')
        self.dir = Path(root).resolve() / name if root is not None else experiment_root() / name

        reset = bool(args.reset)
        if reset:
            args.load = ''
            args.resume = 0
        problem = None
        if self.is_main:
            if reset and self.dir.exists():
                # In Python, never through a shell: a name with spaces or ';' cannot do harm.
                shutil.rmtree(self.dir)
            problem = self._folder_problem(args)
        # Barrier: the other processes wait for rank 0's reset and checks, and fail with its message.
        problem = broadcast_object(problem)
        if problem is not None:
            raise RankZeroError(problem)

        self._log_file = None
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.path('log.txt'), 'a', encoding='utf-8')  # noqa: SIM115 (kept open)
            self._run_start = self._log_file.tell()  # where this run's lines begin
            self._write_config()

    def _folder_problem(self, args: argparse.Namespace) -> str | None:
        """Why the experiment folder cannot serve this run (None when it can)."""
        if args.load and not (self.dir / STATE_FILE).is_file() and not _has_models(self.dir):
            return f'--load {args.load}: {self.dir} holds no checkpoint to continue from'
        if not args.load and not args.test_only and (self.dir / STATE_FILE).is_file():
            return (f'--save {args.save}: {self.dir} already holds a training run; continue it with '
                    f'--load {args.save} --resume -1, start over with --reset, or choose another --save')
        return None

    # ------------------------------------------------------------------ paths and log
    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def write_log(self, line: str, echo: bool = True) -> None:
        """Append `line` to log.txt and print it unless echo is False (main process only)."""
        if not self.is_main:
            return
        if echo:
            from tqdm import tqdm

            # tqdm.write keeps an active progress bar intact; it is a plain print otherwise.
            tqdm.write(line, file=sys.stdout)
        if self._log_file is not None:
            self._log_file.write(line + '\n')
            self._log_file.flush()

    def log_size(self) -> int:
        """Bytes in log.txt so far: stored in each checkpoint so a resume can drop later lines."""
        if self._log_file is None:
            return 0
        self._log_file.flush()
        return self._log_file.tell()

    def rewind_log(self, size: int, note: str) -> None:
        """Drop what earlier runs wrote to log.txt after its first `size` bytes (lines of an epoch that
        is about to be redone), keep this run's own lines, and add `note`.

        The dropped lines are kept in log_discarded.txt rather than lost.
        """
        if self._log_file is None:
            return
        self._log_file.close()
        path = self.path('log.txt')
        data = path.read_bytes()
        start = min(self._run_start, len(data))
        if size < start:
            with open(self.path('log_discarded.txt'), 'ab') as f:
                f.write(data[size:start])
            atomic_write_bytes(path, data[:size] + data[start:])
            self._run_start = size
        self._log_file = open(path, 'a', encoding='utf-8')  # noqa: SIM115
        self.write_log(note)

    def _write_config(self) -> None:
        now = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
        lines = [f'# {now}  {" ".join(sys.argv)}']
        lines += [f'{k}: {v}' for k, v in sorted(vars(self.args).items())]
        old = self.path('config.txt').read_text(encoding='utf-8') if self.path('config.txt').exists() else ''
        atomic_write_text(self.path('config.txt'), old + '\n'.join(lines) + '\n\n')

    def done(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ------------------------------------------------------------------ outputs
    def save_image(self, dataset: str, stem: str, scale: int, tag: str, img: np.ndarray) -> Path:
        """results-<dataset>/<stem>_x<scale>_<tag>.png, atomically (inline: simple, and nothing to flush)."""
        path = self.path(f'results-{dataset}', f'{stem}_x{scale}_{tag}.png')
        if self.is_main:
            atomic_write_bytes(path, encode_png(img))
        return path

    def write_results(self, entries: Sequence[dict]) -> None:
        """results.json: one object per (dataset, scale) of the latest evaluation."""
        if self.is_main:
            atomic_write_text(self.path('results.json'), json.dumps(list(entries), indent=2) + '\n')

    def save_torch(self, obj: object, name: str) -> None:
        if self.is_main:
            atomic_torch_save(obj, self.path(name))

    def plot_psnr(self, history: Iterable[dict]) -> None:
        """psnr_<dataset>.png: PSNR per epoch, one line per scale."""
        if not self.is_main:
            return
        by_set: dict[str, dict[int, list[tuple[int, float]]]] = {}
        for r in history:
            if r.get('psnr') is not None:
                by_set.setdefault(r['dataset'], {}).setdefault(r['scale'], []).append((r['epoch'], r['psnr']))
        for name, scales in by_set.items():
            series = {f'x{s}': pts for s, pts in sorted(scales.items())}
            save_plot(self.path(f'psnr_{name}.png'), f'SR on {name}', 'PSNR (dB)', series)


def _has_models(folder: Path) -> bool:
    return (folder / 'model').is_dir() and any((folder / 'model').glob('model_*.pt'))


def save_plot(path: Path, title: str, ylabel: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """Line plot of (epoch, value) series as a PNG, written atomically (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        plotted = False
        for label, pts in series.items():
            pts = [(e, v) for e, v in pts if v is not None and math.isfinite(v)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker='.' if len(pts) < 30 else None, label=label)
                plotted = True
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(title)
        ax.set_xlabel('Epoch')
        ax.set_ylabel(ylabel)
        ax.grid(True)
        if plotted:  # (all-NaN series, e.g. an epoch of skipped batches, draw nothing to label)
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format='png', dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
