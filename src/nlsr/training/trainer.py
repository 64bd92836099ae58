"""EDSR's loop: train --test_every batches, evaluate every test set at every scale, checkpoint, repeat.

Evaluation lives in evaluate.py, the resume state in training_state.py and the learning rate in
schedule.py. Under torchrun every process runs this loop on its share of each global batch (the model
wrapper's DDP averages the gradients, so the step equals a single-process step on the whole batch); the loss
values are averaged across processes before logging and before --skip_threshold decides, so all processes
skip alike.

With --accumulate N each optimizer step runs N forwards and backwards on equal slices of the batch (DDP
averages gradients on the last one only) and counts as one batch everywhere: learning rate, skips,
--gclip, the progress and the loss curve. With --ema_decay the weight average (ema.py) follows every
optimizer step; evaluation and the model files use it, the training state keeps both.

What a run shows as it goes (progress, loss_curve.csv, plots, TensorBoard) lives in watch.py.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
from collections.abc import Callable, Iterator

import torch

from nlsr import distributed
from nlsr.errors import UserError
from nlsr.loss import Loss
from nlsr.model.checkpoint import plain_state_dict
from nlsr.runs.experiment import Experiment, ResumePoint
from nlsr.runs.loss_log import LossLog
from nlsr.runs.watch import Watch
from nlsr.training.ema import WeightAverage, average_from_flags, restore_average, share_average, weights_in_use
from nlsr.training.evaluate import Evaluator
from nlsr.training.schedule import lr_at, set_lr
from nlsr.training.seeding import rank_seed, seed_everything
from nlsr.training.training_state import TrainingState

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """--optimizer ADAM | ADAMW | SGD | RMSprop with the published hyper-parameter flags (ADAMW: decoupled
    --weight_decay)."""
    common = {'lr': args.lr, 'weight_decay': args.weight_decay}
    if args.optimizer == 'SGD':
        return torch.optim.SGD(params, momentum=args.momentum, **common)
    if args.optimizer == 'RMSprop':
        return torch.optim.RMSprop(params, eps=args.epsilon, **common)
    if args.optimizer == 'ADAMW':
        return torch.optim.AdamW(params, betas=tuple(args.betas), eps=args.epsilon, **common)
    return torch.optim.Adam(params, betas=tuple(args.betas), eps=args.epsilon, **common)


def accumulate_gradients(model: torch.nn.Module, loss: Loss, scaler: torch.amp.GradScaler,
                         autocast: Callable[[], contextlib.AbstractContextManager], lr_img: torch.Tensor,
                         hr: torch.Tensor, idx_scale: int, n: int) -> list[float]:
    """Forward and backward of a batch in `n` (--accumulate) equal micro-batches, gradients summed (each loss
    divided by n: the batch's mean loss); returns the batch's loss values (loss.columns), the micro-batches'
    mean. The GAN discriminator steps on each micro-batch before its loss. Under DDP only the last backward
    averages the gradients across processes."""
    values = []
    for i, (lr_part, hr_part) in enumerate(zip(lr_img.chunk(n), hr.chunk(n), strict=True)):
        with model.gradient_sync(i == n - 1):
            with autocast():
                sr = model(lr_part, idx_scale)
            sr = sr.float()  # the loss in float32, whatever the forward ran in
            discriminator = loss.discriminator_step(sr, hr_part)
            result = loss(sr, hr_part)
            scaler.scale(result.total / n if n > 1 else result.total).backward()
        values.append(loss.step_values(result, discriminator))
    return [sum(column) / n for column in zip(*values, strict=True)]


def cycle_batches(loader: object, count: int) -> Iterator:
    """Exactly `count` batches, restarting the loader if it runs out first."""
    def cycle() -> Iterator:
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise UserError('the training set yields no batches (check --data_train and --batch_size)')
    return itertools.islice(cycle(), count)


def stop_if_skipping(skips: int, limit: int, finished: int) -> None:
    """--max_skips: stop the run once `limit` consecutive batches were skipped (`finished` epochs are saved)."""
    if skips >= limit:
        raise distributed.RankZeroError(
            f'--max_skips {limit}: {skips} consecutive batches skipped (loss not finite or over --skip_threshold); '
            f'training stopped, the checkpoint of epoch {finished} is intact (resume with a lower --lr)')


def check_finite(model: torch.nn.Module, epoch: int) -> None:
    """Refuse to checkpoint weights that are not finite (every process alike: the weights are the same)."""
    if not all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()):
        raise distributed.RankZeroError(f'epoch {epoch}: the weights are not finite (training diverged): not '
                                        f'written; the checkpoint of epoch {epoch - 1} is intact')


class Trainer:
    """main() calls train() and test() until terminate(): one epoch of --test_every batches, then evaluation
    and a checkpoint (model files, logs, plots, then the training state)."""

    def __init__(self, args: argparse.Namespace, loader: object, model: torch.nn.Module,
                 loss: Loss | None, experiment: Experiment, resume: ResumePoint | None = None) -> None:
        self.args, self.exp, self.model, self.loss = args, experiment, model, loss
        self.loss_log = LossLog(loss.columns) if loss is not None else None  # the epoch means, saved and resumed
        self.loader_train = loader.loader_train
        self.device = model.device
        self.tty = sys.stdout.isatty() and experiment.is_main  # progress bars on the process that logs
        self.evaluator = Evaluator(args, list(loader.loader_test), model, experiment, self.tty)
        self.epoch = 0  # finished epochs
        self.error_last = 1e8  # mean loss of the previous epoch, for --skip_threshold
        self.skips = 0  # consecutive skipped batches, for --max_skips
        self.log_marks: list[int] = []  # log.txt size after the checkpoint of epoch e is log_marks[e - 1]
        self.optimizer: torch.optim.Optimizer | None = None
        if not args.test_only:
            if self.loader_train is None:
                raise UserError('no training data: give --data_train (or use --test_only)')
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise UserError(f'--model {args.model} has no trainable parameters: use it with --test_only')
            self.optimizer = make_optimizer(args, params)
        self.ema: WeightAverage | None = average_from_flags(args, model, experiment.write_log)
        # --amp: the training forward under autocast; fp16 also needs loss scaling (a disabled GradScaler is a
        # pass-through, so there is one code path).
        self.amp_dtype = AMP_DTYPES.get(args.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == 'fp16' and not args.test_only)
        if self.amp_dtype is not None and not args.test_only:
            experiment.write_log(f'Mixed precision: {args.amp} autocast on {self.device.type}'
                                 + (' with a GradScaler' if self.scaler.is_enabled() else ''))
        if resume is not None:  # the experiment's decision (Experiment.resume_point)
            self.resume(resume)
        self.watch = Watch(args, experiment, self.loss_log, self.tty, self.epoch, self.evaluator.history)

    def _set_lr(self, batch: int) -> float:
        """The schedule's LR of `batch` on every optimizer (the network's and the loss's own)."""
        return set_lr([self.optimizer, *self.loss.optimizers()], lr_at(self.args, batch))

    def train(self) -> None:
        """One epoch: --test_every batches at the schedule's learning rates."""
        args = self.args
        epoch = self.epoch + 1
        # Per-epoch, per-process seeds: an epoch's random draws depend on its number only, so a resumed run
        # draws what an uninterrupted one does (rank 0 keeps the single-process seed).
        seed_everything(rank_seed(args.seed + epoch, distributed.get_rank()))
        sampler = getattr(self.loader_train, 'batch_sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch - 1)
        first = (epoch - 1) * args.test_every
        self.exp.write_log(f'[Epoch {epoch}]\tLearning rate: {self._set_lr(first):.2e}')
        self.loss_log.start_epoch()
        self.model.train()
        self.loss.train()
        self.watch.start_epoch(epoch)
        for batch, item in enumerate(cycle_batches(self.loader_train, args.test_every)):  # data.common.TrainItem
            idx_scale = int(item.idx_scale.flatten()[0]) if torch.is_tensor(item.idx_scale) else int(item.idx_scale)
            lr_img, hr = item.lr.to(self.device, non_blocking=True), item.hr.to(self.device, non_blocking=True)
            self.watch.data_ready()
            lr_now = self._set_lr(first + batch)
            self.optimizer.zero_grad(set_to_none=True)
            values = accumulate_gradients(self.model, self.loss, self.scaler, self._autocast, lr_img, hr, idx_scale,
                                          args.accumulate)
            # Averaged over processes (the global batch's): every process takes the same --skip_threshold
            # decision (one skipping a backward would hang DDP).
            values = distributed.all_reduce_mean(values, self.device)
            value = values[-1]  # the total
            # NaN/inf fail this comparison too, so a diverging batch never reaches the weights.
            kept = value < args.skip_threshold * self.error_last
            if kept:
                if args.gclip > 0:
                    self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_value_(self.model.parameters(), args.gclip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema is not None:
                    self.ema.update(first + batch)
                self.loss_log.record(values)
                self.skips = 0
            else:
                self.exp.write_log(f'Skip batch {batch + 1}: loss {value:.4g} is over --skip_threshold '
                                   f'{args.skip_threshold:g} x last epoch mean {self.error_last:.4g}')
                self.skips += 1
                stop_if_skipping(self.skips, args.max_skips, self.epoch)
            self.watch.batch_done(lr_now, kept, values)
        self.watch.end_epoch()
        self.loss_log.end_epoch()
        if math.isfinite(self.loss_log.epoch_mean()):
            self.error_last = self.loss_log.epoch_mean()
        self.epoch = epoch
        self._set_lr(epoch * args.test_every)  # the optimizers hold the LR of the next batch

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def test(self) -> None:
        """Evaluate; when training, checkpoint (model_best too when the first set's PSNR improved)."""
        with weights_in_use(self.ema):
            is_best = self.evaluator.run(self.epoch, 'EMA weights' if self.ema is not None else '')
        self.watch.evaluated(self.evaluator.history)
        if not self.args.test_only:
            self.save(is_best)

    def save(self, is_best: bool = False) -> None:
        """Model files, logs and plots, then the training state (the commit record) last; rank 0 only."""
        exp = self.exp
        check_finite(self.model, self.epoch)
        if not exp.is_main:
            return
        with weights_in_use(self.ema):
            self.model.save(exp.dir, self.epoch, is_best)
        self.loss_log.save(exp, self.watch.loss_points())
        exp.save_torch(self.evaluator.psnr_table(self.epoch), 'psnr_log.pt')
        self.watch.checkpoint(self.evaluator.history)
        self.log_marks = self.log_marks[:self.epoch - 1] + [exp.log_size()]
        TrainingState(epoch=self.epoch, model=plain_state_dict(self.model), optimizer_name=self.args.optimizer,
                      optimizer=self.optimizer.state_dict(), loss={**self.loss.state(), **self.loss_log.state()},
                      error_last=self.error_last,
                      scaler=self.scaler.state_dict(), history=list(self.evaluator.history),
                      log_marks=list(self.log_marks),
                      ema=self.ema.state_dict() if self.ema is not None else {}).save(exp.dir)

    def resume(self, point: ResumePoint) -> None:
        """Continue from `point` (--load NAME): rank 0 reads the experiment folder (the others may not see it) and
        loads the weights; the weights and the rest of the state are broadcast, and every process applies the
        same state."""
        state, problem = None, None
        if distributed.get_rank() == 0:
            try:
                state = self._read_resume_point(point)
            except UserError as e:
                problem = str(e)
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise distributed.RankZeroError(problem)
        with torch.no_grad():
            distributed.broadcast_tensors(self.model.state_dict().values())
        state = distributed.broadcast_object(state)
        share_average(self.ema, stored=bool(state.ema))  # rank 0's stored average, else the resumed weights
        self._apply(state, point)

    def _read_resume_point(self, point: ResumePoint) -> TrainingState:
        """Load the weights of the epoch to resume from into the model; the state of that epoch, without weights."""
        args, exp = self.args, self.exp
        stored = TrainingState.load(exp.dir)
        if point.epoch > 0:
            self.model.load_state(self.model.checkpoint_path(exp.dir, f'model_{point.epoch}'), flag='--resume')
            epoch = point.epoch
        elif stored is not None:
            average = stored.ema.get('weights', {}) if args.test_only else {}  # evaluate what the run evaluated
            self.model.load_weights({**stored.model, **average}, f'{exp.dir} training state')
            epoch = stored.epoch
        else:
            self.model.load_state(self.model.checkpoint_path(exp.dir, 'model_latest'), flag=f'--load {point.name}')
            epoch = 0
        if stored is None or stored.epoch < epoch:
            return TrainingState(epoch=epoch)
        state = stored.at_epoch(epoch)
        state.ema = restore_average(self.ema, state.ema, f'{exp.dir} training state')
        return state

    def _apply(self, state: TrainingState, point: ResumePoint) -> None:
        """Continue from `state` (every process alike)."""
        args = self.args
        self.epoch = state.epoch
        self.evaluator.history = list(state.history)
        if args.test_only:
            self.exp.write_log(f'Evaluating experiment {point.name} at epoch {state.epoch}')
            return
        if state.optimizer is not None and state.optimizer_name == args.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
            self.error_last = state.error_last
            if state.scaler and self.scaler.is_enabled():
                self.scaler.load_state_dict(state.scaler)
            note = f'Resumed at epoch {state.epoch} (learning rate {self._set_lr(state.epoch * args.test_every):.2e})'
        else:
            # Only the latest epoch's optimizer moments are kept: start them afresh on the scheduled LR.
            source = f'model_{state.epoch}.pt' if point.epoch > 0 else 'the latest weights'
            note = (f'Resumed at epoch {state.epoch} from {source} with fresh {args.optimizer} moments '
                    f'(learning rate {self._set_lr(state.epoch * args.test_every):.2e})')
        if state.loss is not None:
            self.loss.load(state.loss)
            self.loss_log.load(state.loss, epochs=state.epoch)
        self.log_marks = list(state.log_marks)
        if self.log_marks and len(self.log_marks) == state.epoch:
            self.exp.rewind_log(self.log_marks[-1], note)
        else:
            self.exp.write_log(note)

    def terminate(self) -> bool:
        """True when training is over; with --test_only, evaluates once and stops."""
        if self.args.test_only:
            self.test()
        done = self.args.test_only or self.epoch >= self.args.epochs
        if done:
            self.watch.close()
        return done
