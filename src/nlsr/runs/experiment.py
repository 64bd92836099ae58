"""The experiment folder of a run: experiment/<save>/ with log.txt, config.txt, result images, results.json
and plots.

Everything a run writes lives in experiment/<save>/ (or experiment/<load>/ when continuing) at the
repository root, whatever the working directory (an installed package: ./experiment); SR_EXPERIMENT_ROOT
overrides that root (tests use it).
Only the main process writes, so a distributed run logs each line once. It holds an OS lock
(fcntl.flock) on experiment/.<name>.lock, beside the folder, while the run lasts, so two runs never write
one folder; the OS releases the lock of a process that dies. A worker group that torchrun restarts
(TORCHELASTIC_RESTART_COUNT > 0) continues from the folder's training state when that run had the same
configuration.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import io
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nlsr.distributed import RankZeroError, broadcast_object, is_main_process
from nlsr.errors import UserError
from nlsr.fileio import WriteError, atomic_torch_save, atomic_write_bytes, atomic_write_text
from nlsr.training.training_state import TrainingState, has_training_state

# Settings that may differ between two runs of one configuration (how it was started, not what it trains).
RUN_NEUTRAL = ('cli_flags', 'load', 'resume', 'reset', 'debug')
RESTART_LOCK_WAIT = 60.0  # seconds


def checkout_root() -> Path | None:
    """The repository this package runs from (src/nlsr/ beside pyproject.toml), or None when installed."""
    src = Path(__file__).resolve().parents[2]
    return src.parent if src.name == 'src' and (src.parent / 'pyproject.toml').is_file() else None


def experiment_root() -> Path:
    """$SR_EXPERIMENT_ROOT when set, else <repository>/experiment from a checkout (whatever the working
    directory), else ./experiment (an installed package)."""
    override = os.environ.get('SR_EXPERIMENT_ROOT')
    if override:
        return Path(override).resolve()
    return (checkout_root() or Path.cwd()) / 'experiment'


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW or HxWxC image (C=1 is written as grayscale)."""
    import imageio.v3 as iio

    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return iio.imwrite('<bytes>', img, extension='.png')


@dataclass(frozen=True)
class ResumePoint:
    """What a run continues from: experiment/<name>/'s training state (epoch -1 or 0: the latest, else its
    model_latest files) or its model_<epoch> files (epoch > 0: --resume N)."""

    name: str
    epoch: int = -1


def resume_point(args: argparse.Namespace, name: str, restarted: bool = False) -> ResumePoint | None:
    """The resume decision: a restarted torchrun group continues its own run from the latest state; else
    --load NAME continues NAME at --resume; --reset (or no --load) starts afresh."""
    if restarted:
        return ResumePoint(name, -1)
    if args.load and not args.reset:
        return ResumePoint(args.load, args.resume)
    return None


class Experiment:
    """The experiment folder of one run: paths, the log, config.txt, images, results.json and plots.

    Rank 0 writes; it also reads what decides whether the folder may be used (its lock, config.txt, whether a
    training state or model files exist) and hands the verdict to the other ranks. `resume_point` is what the
    run continues from (None: it starts afresh); the configuration is read, never changed. What goes into a
    checkpoint and how a run resumes is the training state's business (training/training_state.py).
    """

    def __init__(self, args: argparse.Namespace, root: str | os.PathLike | None = None,
                 is_main: bool | None = None, restart: int = 0) -> None:
        self.args = args
        self.is_main = is_main_process() if is_main is None else is_main
        name = args.load or args.save
        if not name or Path(name).name != name or name in ('.', '..'):
            raise UserError(f'--save/--load {name!r}: expected a plain folder name (experiment/<name>/)')
        self.dir = Path(root).resolve() / name if root is not None else experiment_root() / name

        problem, resume_epoch, self._lock = None, None, None
        if self.is_main:
            # A restarted group waits a little for the dead group's process to be gone (the OS frees its lock).
            problem = self._acquire_lock(patience=RESTART_LOCK_WAIT if restart else 0.0)
            if problem is None and restart and not args.test_only and has_training_state(self.dir):
                problem, resume_epoch = self._restart_point(restart)
        problem, resume_epoch = broadcast_object((problem, resume_epoch))
        # Every process alike: a restarted group continues its run, else --load/--resume/--reset decide.
        self.resume_point = resume_point(args, name, restarted=problem is None and resume_epoch is not None)
        if self.is_main and problem is None:
            if args.reset and self.resume_point is None and self.dir.exists():
                shutil.rmtree(self.dir)  # in Python, never through a shell: a name with ';' cannot do harm
            for tmp in self.dir.rglob('.*.tmp'):  # left by a killed write (fileio.atomic_write); never read
                tmp.unlink()
            problem = self._folder_problem()
        # Barrier: the other processes wait for rank 0's reset and checks, and fail with its message.
        problem = broadcast_object(problem)
        if problem is not None:
            self.done()
            raise RankZeroError(problem)

        self._log_file = None
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.path('log.txt'), 'a', encoding='utf-8')  # noqa: SIM115 (kept open)
            self._run_start = self._log_file.tell()  # where this run's lines begin
            self._write_config()
            if restart and self.resume_point is None:  # the dead group's lines before any checkpoint
                self.rewind_log(0, f'restart {restart}: starting afresh (no checkpoint yet)')
        if resume_epoch is not None:
            self.write_log(f'restart {restart}: resuming from epoch {resume_epoch}')

    def _acquire_lock(self, patience: float = 0.0) -> str | None:
        """Take the folder's lock (None), or say which process holds it, after trying for `patience` seconds.
        The lock file names its holder; done() removes it (a lock taken on a file that was removed meanwhile
        does not count)."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        path = self.dir.parent / f'.{self.dir.name}.lock'
        deadline = time.monotonic() + patience
        while True:
            lock = open(path, 'a+', encoding='utf-8')  # noqa: SIM115 (held until done())
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:  # not removed by its holder meanwhile
                    break
            except OSError:
                pass
            lock.seek(0)
            holder = lock.read().strip() or 'another process'
            lock.close()
            if time.monotonic() >= deadline:
                return (f'--save/--load {self.dir.name}: {self.dir} is in use by {holder} ({path} is locked); '
                        'wait for that run to end or choose another --save')
            time.sleep(0.5)
        lock.seek(0)
        lock.truncate()
        lock.write(f'host {socket.gethostname()} pid {os.getpid()}\n')
        lock.flush()
        self._lock = lock
        return None

    def _restart_point(self, restart: int) -> tuple[str | None, int | None]:
        """A restarted worker group: the epoch of the folder's training state when it is this configuration's
        run, else why not (a different configuration is refused, as without a restart)."""
        old = read_config(self.path('config.txt'))
        new = dict(_config_items(self.args))
        diff = sorted(k for k in set(old) | set(new) if k not in RUN_NEUTRAL and old.get(k) != new.get(k))
        if diff:
            return (f'restart {restart}: {self.dir} holds a run of another configuration (differs in '
                    f'{", ".join("--" + k for k in diff[:5])}); refusing to continue it'), None
        try:
            return None, TrainingState.load(self.dir).epoch
        except UserError as e:
            return str(e), None

    def _folder_problem(self) -> str | None:
        """Why the experiment folder cannot serve this run (None when it can)."""
        load, name, test_only = self.resume_point is not None, self.dir.name, self.args.test_only
        if load and not has_training_state(self.dir) and not _has_models(self.dir):
            return f'--load {name}: {self.dir} holds no checkpoint to continue from'
        if load and not test_only and not has_training_state(self.dir) and _trained_here(self.dir):
            # Its model files may be of an epoch whose training state was never written.
            return (f'--load {name}: {self.dir} stopped before its first complete checkpoint (no '
                    f'training state); start it again with --save {name} --reset')
        if not load and not test_only and has_training_state(self.dir):
            return (f'--save {name}: {self.dir} already holds a training run; continue it with '
                    f'--load {name} --resume -1, start over with --reset, or choose another --save')
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
            try:
                self._log_file.write(line + '\n')
                self._log_file.flush()
            except OSError as e:
                raise WriteError(f'{self.path("log.txt")}: cannot write ({e.strerror or e})') from e

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
        lines += [f'{k}: {v}' for k, v in _config_items(self.args)]
        old = self.path('config.txt').read_text(encoding='utf-8') if self.path('config.txt').exists() else ''
        atomic_write_text(self.path('config.txt'), old + '\n'.join(lines) + '\n\n')

    def done(self) -> None:
        """Close the log and release the folder's lock."""
        if getattr(self, '_log_file', None) is not None:
            self._log_file.close()
            self._log_file = None
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)  # still held: no other process has it
            self._lock.close()  # closing the file releases the flock
            self._lock = None

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

    def plot(self, name: str, title: str, ylabel: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """<name>.png: one line per series of (epoch, value) points (main process only)."""
        if self.is_main:
            save_plot(self.path(f'{name}.png'), title, ylabel, series)


def _config_items(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The settings config.txt records, as (name, text) in name order."""
    return [(k, str(v)) for k, v in sorted(vars(args).items())]


def read_config(path: Path) -> dict[str, str]:
    """The settings of the last block of a config.txt, as name -> text ({} when there is none)."""
    blocks = path.read_text(encoding='utf-8').split('\n# ') if path.is_file() else ['']
    pairs = (ln.split(': ', 1) for ln in blocks[-1].splitlines()[1:] if ': ' in ln)
    return {k: v for k, v in pairs}


def _trained_here(folder: Path) -> bool:
    """True when the folder's log shows a training run of this trainer (an epoch started)."""
    log = folder / 'log.txt'
    return log.is_file() and b'[Epoch ' in log.read_bytes()


def _has_models(folder: Path) -> bool:
    return (folder / 'model').is_dir() and any((folder / 'model').glob('model_*'))


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
