"""The training state: everything a resume needs, in one versioned file, experiment/<name>/training_state.pt.

It holds the weights (and their --ema_decay average), the optimizer, the loss log (and the GAN
discriminator), the evaluation history, the --skip_threshold reference, the GradScaler and the log.txt
positions of each checkpoint. It is written
last at every checkpoint, atomically, so a run killed at any moment resumes from one consistent epoch.
An experiment folder without it is read from optimizer.pt (format 1: the same content plus a 'scheduler'
entry, which the learning-rate schedule no longer needs).

Under torchrun, rank 0 reads the file and the other processes receive it by broadcast (see
Trainer.resume): one resume path for any number of processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nlsr.errors import UserError
from nlsr.fileio import atomic_torch_save
from nlsr.runs.records import HistoryEntry

FORMAT = 2
STATE_FILE = 'training_state.pt'
LEGACY_STATE_FILE = 'optimizer.pt'  # format 1: the same content with a 'scheduler' entry, now unused


@dataclass
class TrainingState:
    """The state after `epoch` finished epochs (weights as the Model wrapper's plain state dict)."""

    epoch: int
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_name: str = ''
    optimizer: dict | None = None
    loss: dict | None = None
    error_last: float = 1e8
    scaler: dict = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    log_marks: list[int] = field(default_factory=list)
    ema: dict = field(default_factory=dict)  # ema.WeightAverage.state_dict(); {} without --ema_decay

    def to_dict(self) -> dict:
        """Plain containers only, so torch.load(weights_only=True) reads it back."""
        out = asdict(self)
        out['history'] = [asdict(h) for h in self.history]
        return {'format': FORMAT, **out}

    @classmethod
    def from_dict(cls, obj: dict, source: str) -> TrainingState:
        if not isinstance(obj, dict) or obj.get('format') not in (1, FORMAT) or 'epoch' not in obj:
            raise UserError(f'{source}: not a training state written by this trainer')
        _check_entries(obj, source)
        history = [HistoryEntry(**{k: h[k] for k in ('epoch', 'dataset', 'scale', 'psnr', 'ssim')})
                   for h in obj.get('history', [])]
        return cls(epoch=int(obj['epoch']), model=obj.get('model', {}), optimizer_name=obj.get('optimizer_name', ''),
                   optimizer=obj.get('optimizer'), loss=obj.get('loss'), error_last=obj.get('error_last', 1e8),
                   scaler=obj.get('scaler') or {}, history=history, log_marks=list(obj.get('log_marks', [])),
                   ema=obj.get('ema') or {})

    def save(self, folder: str | Path) -> None:
        """Write folder/training_state.pt atomically."""
        atomic_torch_save(self.to_dict(), Path(folder) / STATE_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> TrainingState | None:
        """The state in folder (training_state.pt, else the older optimizer.pt), or None when there is none."""
        path = state_path(folder)
        if path is None:
            return None
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise UserError(f'{path}: unreadable training state ({type(e).__name__}: {first})') from None
        return cls.from_dict(obj, str(path))

    def at_epoch(self, epoch: int) -> TrainingState:
        """This state cut back to `epoch` (<= self.epoch): history, loss log rows and log marks of the first
        `epoch` epochs; the optimizer and the weight average only when they belong to that epoch."""
        loss = None
        if self.loss is not None:
            loss = dict(self.loss, log=self.loss['log'][:epoch])
        same = epoch == self.epoch
        return TrainingState(epoch=epoch, optimizer_name=self.optimizer_name if same else '',
                             optimizer=self.optimizer if same else None, loss=loss,
                             error_last=self.error_last if same else 1e8, scaler=self.scaler if same else {},
                             history=[h for h in self.history if h.epoch <= epoch],
                             log_marks=list(self.log_marks[:epoch]), ema=self.ema if same else {})


def _check_entries(obj: dict, source: str) -> None:
    """Refuse entries a training state written by this trainer cannot hold (a damaged or edited file)."""
    history_keys = {'epoch', 'dataset', 'scale', 'psnr', 'ssim'}
    checks = {
        'epoch': lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        'model': lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
        'history': lambda v: isinstance(v, list) and all(isinstance(h, dict) and history_keys <= set(h) for h in v),
        'log_marks': lambda v: isinstance(v, list) and all(isinstance(m, int) for m in v),
        'optimizer': lambda v: v is None or isinstance(v, dict),
        'loss': lambda v: v is None or isinstance(v, dict),
    }
    for entry, ok in checks.items():
        if entry in obj and not ok(obj[entry]):
            shown = repr(obj[entry])
            raise UserError(f'{source}: damaged training state: entry {entry!r} = '
                            f'{shown if len(shown) <= 60 else shown[:57] + "..."} is not what this trainer writes')


def state_path(folder: str | Path) -> Path | None:
    """The training-state file of an experiment folder, or None when it holds none."""
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def has_training_state(folder: str | Path) -> bool:
    return state_path(folder) is not None
