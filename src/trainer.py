"""EDSR's loop: train --test_every batches, evaluate every test set at every scale, checkpoint, repeat.

Checkpoints: the model files come from Model.save; everything else a resume needs (weights, optimizer,
scheduler, epoch, evaluation history, loss log, log.txt positions) goes into one atomically written
file, experiment/<name>/optimizer.pt, written last. So a run killed at any moment resumes from one
consistent epoch, at exactly the learning rate it had reached.

Under torchrun every process runs this loop on its share of each global batch (the model wrapper's DDP
averages the gradients, so the step equals a single-process step on the whole batch); the loss values are
averaged across processes before logging and before --skip_threshold decides, so all processes skip alike.
Evaluation: each process scores its share of the test images, the scores are gathered in dataset order
(so the means equal a single process's), and result images are sent to rank 0, the only writer. A resume
is read by rank 0 and broadcast.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import math
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from tqdm import tqdm

import metrics
import utility
from errors import UserError
from model import plain_state_dict

STATE_FORMAT = 1
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """--optimizer ADAM | SGD | RMSprop with the published hyper-parameter flags."""
    common = {'lr': args.lr, 'weight_decay': args.weight_decay}
    if args.optimizer == 'SGD':
        return torch.optim.SGD(params, momentum=args.momentum, **common)
    if args.optimizer == 'RMSprop':
        return torch.optim.RMSprop(params, eps=args.epsilon, **common)
    if args.optimizer == 'ADAM':
        return torch.optim.Adam(params, betas=tuple(args.betas), eps=args.epsilon, **common)
    raise UserError(f'--optimizer {args.optimizer!r}: expected ADAM, SGD or RMSprop')


def scheduled_lr(base_lr: float, milestones: list[int], gamma: float, epochs_done: int) -> float:
    """LR of the epoch after `epochs_done` epochs: MultiStepLR stepped once per finished epoch."""
    return base_lr * gamma ** bisect.bisect_right(sorted(milestones), epochs_done)


def batch_lr(args: argparse.Namespace, iteration: int) -> float:
    """LR of training batch `iteration` (0-based, counted over all epochs) under --lr_schedule/--warmup.

    A pure function of the batch number, so a resumed run follows the same curve. Cosine goes from --lr to
    --min_lr over --epochs x --test_every batches; the warm-up ramps linearly up to the scheduled value.
    """
    if args.lr_schedule == 'cosine':
        progress = min(1.0, iteration / max(1, args.epochs * args.test_every))
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        lr = scheduled_lr(args.lr, args.decay_milestones, args.gamma, iteration // args.test_every)
    if iteration < args.warmup:
        lr *= (iteration + 1) / args.warmup
    return lr


def _stdout_is_tty() -> bool:
    return sys.stdout.isatty()


class Trainer:
    def __init__(self, args: argparse.Namespace, loader: object, model: torch.nn.Module,
                 loss: torch.nn.Module | None, ckp: utility.Checkpoint) -> None:
        self.args = args
        self.ckp = ckp
        self.model = model
        self.loss = loss
        self.loader_train = getattr(loader, 'loader_train', None)
        self.loader_test = list(loader.loader_test)
        self.device = getattr(model, 'device', torch.device('cpu'))
        self.tty = _stdout_is_tty() and ckp.is_main  # progress bars on the process that logs
        self.rank, self.world_size = utility.get_rank(), utility.get_world_size()
        self.epoch = 0  # finished epochs
        self.error_last = 1e8  # mean loss of the previous epoch, for --skip_threshold
        # One record per (evaluated epoch, dataset, scale): best tracking, plots and psnr_log.pt.
        self.history: list[dict] = []
        # log.txt size after the checkpoint of epoch e is log_marks[e - 1]: a resume cuts back to it.
        self.log_marks: list[int] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.MultiStepLR | None = None

        if not args.test_only:
            if self.loader_train is None:
                raise UserError('no training data: give --data_train (or use --test_only)')
            if loss is None:
                raise UserError('training needs a loss (internal: main() passes loss.Loss)')
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise UserError(f'--model {args.model} has no trainable parameters: use it with --test_only')
            self.optimizer = make_optimizer(args, params)
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, milestones=args.decay_milestones, gamma=args.gamma)
        # --amp: the network's training forward under autocast; fp16 also needs loss scaling (a disabled
        # GradScaler is a pass-through, so there is one code path).
        amp = getattr(args, 'amp', 'off')
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == 'fp16' and not args.test_only)
        if self.amp_dtype is not None and not args.test_only:
            ckp.write_log(f'Mixed precision: {amp} autocast on {self.device.type}'
                          + (' with a GradScaler' if self.scaler.is_enabled() else ''))
        if args.load:
            self._resume_everywhere()

    # ================================================================== training
    def lr(self) -> float:
        return self.optimizer.param_groups[0]['lr']

    def _set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        return lr

    def _batches(self) -> Iterator:
        """Exactly --test_every batches, restarting the loader if it runs out first."""
        def cycle() -> Iterator:
            while True:
                empty = True
                for batch in self.loader_train:
                    empty = False
                    yield batch
                if empty:
                    raise UserError('the training set yields no batches (check --data_train and --batch_size)')
        return itertools.islice(cycle(), self.args.test_every)

    def train(self) -> None:
        args = self.args
        epoch = self.epoch + 1
        # Seeding per epoch makes an epoch's patches and flips depend on its number only, so a resumed
        # run draws the same data as an uninterrupted one.
        # Per-process seeds for anything random in the model or loss (rank 0 keeps the single-process seed);
        # the patches themselves come from the batch sampler's keys and are the same for every process count.
        utility.seed_everything(utility.rank_seed(args.seed + epoch, self.rank))
        sampler = getattr(self.loader_train, 'batch_sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch - 1)
        # Cosine and warm-up set the LR per batch (the published step schedule changes it per epoch).
        per_batch = getattr(args, 'lr_schedule', 'step') == 'cosine' or getattr(args, 'warmup', 0) > 0
        first = (epoch - 1) * args.test_every
        if per_batch:
            self._set_lr(batch_lr(args, first))
        lr_now = self.lr()
        self.ckp.write_log(f'[Epoch {epoch}]\tLearning rate: {lr_now:.2e}')
        self.loss.start_log()
        self.model.train()
        self.loss.train()

        timer_data, timer_model = utility.Timer(), utility.Timer()
        total = args.test_every
        bar = tqdm(total=total, desc=f'Epoch {epoch}', ncols=100, leave=False, disable=not self.tty,
                   file=sys.stdout)
        for batch, items in enumerate(self._batches()):
            lr_img, hr, idx_scale = items[0], items[1], items[2]
            idx_scale = int(idx_scale.flatten()[0]) if torch.is_tensor(idx_scale) else int(idx_scale)
            lr_img = lr_img.to(self.device, non_blocking=True)
            hr = hr.to(self.device, non_blocking=True)
            timer_data.hold()
            timer_model.tic()

            if per_batch:
                lr_now = self._set_lr(batch_lr(args, first + batch))
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                sr = self.model(lr_img, idx_scale)
            loss = self.loss(sr.float(), hr)  # the loss in float32, whatever the forward ran in
            value = self._synced_loss_value()
            # NaN/inf fail this comparison too, so a diverging batch never reaches the weights.
            if value < args.skip_threshold * self.error_last:
                self.scaler.scale(loss).backward()
                if args.gclip > 0:
                    self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_value_(self.model.parameters(), args.gclip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.loss.record()
            else:
                self.ckp.write_log(f'Skip batch {batch + 1}: loss {value:.4g} is over --skip_threshold '
                                   f'{args.skip_threshold:g} x last epoch mean {self.error_last:.4g}')
            timer_model.hold()

            bar.set_postfix_str(f'loss {value:.4f} lr {lr_now:.1e}', refresh=False)
            bar.update()
            if (batch + 1) % args.print_every == 0:
                self.ckp.write_log(
                    f'[{(batch + 1) * args.batch_size}/{total * args.batch_size}]\t{self.loss.display()}\t'
                    f'{timer_model.release():.1f}+{timer_data.release():.1f}s', echo=not self.tty)
            timer_data.tic()
        bar.close()

        self.loss.end_log()
        if math.isfinite(self.loss.epoch_mean()):
            self.error_last = self.loss.epoch_mean()
        with warnings.catch_warnings():
            # With every batch skipped the optimizer never stepped; the schedule follows epochs anyway.
            warnings.simplefilter('ignore', UserWarning)
            self.scheduler.step()
        self.loss.step_epoch()
        self.epoch = epoch

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _synced_loss_value(self) -> float:
        """The batch's total loss, averaged over processes under torchrun.

        Each process holds the mean over its equal share of the global batch, so the average is the global
        batch's loss: what a single process logs, and the same --skip_threshold decision on every process
        (one process skipping a backward that the others run would hang DDP).
        """
        if self.world_size > 1:
            self.loss.set_last_values(utility.all_reduce_mean(self.loss.last_values(), self.device))
        return self.loss.last_total()

    # ================================================================== evaluation
    def _forward_test(self, lr_img: torch.Tensor, idx_scale: int) -> torch.Tensor:
        chunks = lr_img.chunk(max(1, self.args.split_batch), dim=0)
        return torch.cat([self.model(c, idx_scale) for c in chunks], dim=0)

    def _gather(self, scores: list[tuple[int, tuple[str, float | None, float | None]]]) -> list:
        """Per-image (stem, psnr, ssim) of all processes in dataset order, from this process's
        (dataset index, score) pairs: the means then add up in the order a single process uses."""
        pairs = [p for part in utility.all_gather_objects(scores) for p in part]
        return [score for _, score in sorted(pairs, key=lambda p: p[0])]

    def _write_images(self, dataset: str, scale: int, item: tuple[str, list] | None) -> None:
        """Result images of one round (one image per process at most) written by rank 0 alone.

        Every process calls this once per round, with None when it has no image left, so the gather
        pairs up; images travel one round at a time, so rank 0 never holds a whole test set.
        """
        if not (self.args.save_results or self.args.save_gt):
            return
        for got in utility.gather_to_main(item) or []:
            if got is None:
                continue
            stem, images = got
            for tag, img in images:
                self.ckp.save_image(dataset, stem, scale, tag, img)

    def _score(self, ds: object, scale: int, lr_img: torch.Tensor, hr: torch.Tensor, sr: torch.Tensor,
               stem: str) -> tuple[tuple[str, float | None, float | None], list]:
        """(stem, PSNR, SSIM) of one image (None without ground truth) and the images to save."""
        args = self.args
        sr_img = metrics.tensor_to_image(sr[0].float().cpu(), args.rgb_range)
        psnr = ssim = None
        hr_img = None
        if ds.has_gt:
            hr_img = metrics.tensor_to_image(hr[0].float().cpu(), args.rgb_range)
            if hr_img.shape != sr_img.shape:
                raise UserError(f'{ds.name}/{stem} x{scale}: SR is {sr_img.shape[:2]} but HR is '
                                f'{hr_img.shape[:2]}; the LR file does not match its HR image')
            sr_m, hr_m = sr_img, hr_img
            if sr_img.shape[2] == 3 and ds.is_gray(stem):
                # A grayscale ground truth is scored on its single channel, not on Y.
                sr_m, hr_m = metrics.rgb_to_gray(sr_img), hr_img[..., :1]
            psnr = metrics.psnr(sr_m, hr_m, crop_border=scale)
            ssim = metrics.ssim(sr_m, hr_m, crop_border=scale)
        images = []
        if args.save_results:
            images.append(('SR', sr_img))
        if args.save_gt:
            images.append(('LR', metrics.tensor_to_image(lr_img[0].float().cpu(), args.rgb_range)))
            if hr_img is not None:
                images.append(('HR', hr_img))
        return (stem, psnr, ssim), images

    def _best(self, dataset: str, scale: int) -> tuple[float, int] | None:
        rows = [r for r in self.history
                if r['dataset'] == dataset and r['scale'] == scale and r['psnr'] is not None]
        if not rows:
            return None
        best = max(rows, key=lambda r: (r['psnr'], -r['epoch']))  # earliest epoch wins ties
        return best['psnr'], best['epoch']

    def test(self) -> None:
        args = self.args
        epoch = self.epoch
        self.ckp.write_log('\nEvaluation:')
        self.model.eval()
        timer_all = utility.Timer()
        entries = []
        is_best = False
        with torch.no_grad():
            for idx_data, d in enumerate(self.loader_test):
                ds = d.dataset
                # Dataset indices of this process's images, in loader order (all of them in one process).
                positions = list(iter(d.sampler))
                rounds = max(utility.all_gather_objects(len(positions)))
                for idx_scale, scale in enumerate(args.scale):
                    ds.set_scale(idx_scale)
                    timer = utility.Timer()
                    scores = []
                    for lr_img, hr, filename in tqdm(d, desc=f'{ds.name} x{scale}', ncols=100, leave=False,
                                                     disable=not self.tty, file=sys.stdout):
                        stem = filename[0] if isinstance(filename, (list, tuple)) else str(filename)
                        sr = self._forward_test(lr_img.to(self.device), idx_scale)
                        score, images = self._score(ds, scale, lr_img, hr, sr, stem)
                        self._write_images(ds.name, scale, (stem, images))
                        scores.append((positions[len(scores)], score))
                    for _ in range(rounds - len(scores)):  # a process with fewer images still takes part
                        self._write_images(ds.name, scale, None)
                    scores = self._gather(scores)
                    seconds = timer.toc()
                    entry = self._summarise(ds.name, scale, scores, seconds, epoch)
                    entries.append(entry)
                    if idx_data == 0 and idx_scale == 0 and entry['psnr'] is not None:
                        previous = self._best(ds.name, scale)
                        is_best = previous is None or entry['psnr'] > previous[0]
                    self.history.append({'epoch': epoch, 'dataset': ds.name, 'scale': scale,
                                         'psnr': entry['psnr'], 'ssim': entry['ssim']})
                    self.ckp.write_log(self._result_line(entry))
        self.ckp.write_results(entries)
        self.ckp.write_log(f'Forward: {timer_all.toc():.2f}s\n')
        if not args.test_only:
            self.save(is_best)

    @staticmethod
    def _summarise(name: str, scale: int, scores: list, seconds: float, epoch: int) -> dict:
        psnrs = [p for _, p, _ in scores if p is not None]
        ssims = [s for _, _, s in scores if s is not None]
        return {'dataset': name, 'scale': scale,
                'psnr': sum(psnrs) / len(psnrs) if psnrs else None,
                'ssim': sum(ssims) / len(ssims) if ssims else None,
                'images': len(scores), 'seconds': round(seconds, 3), 'epoch': epoch}

    def _result_line(self, entry: dict) -> str:
        head = f"[{entry['dataset']} x{entry['scale']}]"
        if entry['psnr'] is None:
            return f"{head}  no ground truth: {entry['images']} images super-resolved"
        best = self._best(entry['dataset'], entry['scale'])
        best_psnr, best_epoch = best if best is not None else (entry['psnr'], entry['epoch'])
        return (f"{head}  PSNR: {entry['psnr']:.3f}  SSIM: {entry['ssim']:.4f}  "
                f'(Best: {best_psnr:.3f} @epoch {best_epoch})')

    # ================================================================== checkpoints
    def psnr_table(self) -> torch.Tensor:
        """psnr_log.pt as published: epochs x test sets x scales (NaN where a cell was not evaluated)."""
        names = [d.dataset.name for d in self.loader_test]
        table = torch.full((self.epoch, len(names), len(self.args.scale)), float('nan'))
        for r in self.history:
            if (r['psnr'] is not None and 1 <= r['epoch'] <= self.epoch and r['dataset'] in names
                    and r['scale'] in self.args.scale):
                table[r['epoch'] - 1, names.index(r['dataset']), self.args.scale.index(r['scale'])] = r['psnr']
        return table

    def save(self, is_best: bool = False) -> None:
        """Model files, logs and plots, then optimizer.pt (the commit record) last."""
        ckp = self.ckp
        if not ckp.is_main:
            return
        self.model.save(ckp.dir, self.epoch, is_best)
        self.loss.save(ckp)
        ckp.save_torch(self.psnr_table(), 'psnr_log.pt')
        ckp.plot_psnr(self.history)
        self.log_marks = self.log_marks[:self.epoch - 1] + [ckp.log_size()]
        state = {
            'format': STATE_FORMAT,
            'epoch': self.epoch,
            'model': plain_state_dict(self.model),
            'optimizer_name': self.args.optimizer,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'loss': self.loss.state(),
            'error_last': self.error_last,
            'scaler': self.scaler.state_dict(),  # empty unless --amp fp16
            'history': list(self.history),
            'log_marks': list(self.log_marks),
        }
        ckp.save_torch(state, utility.STATE_FILE)

    def _load_state_file(self) -> dict | None:
        path = self.ckp.path(utility.STATE_FILE)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f'{path}: unreadable training state ({type(e).__name__}: {e})') from None
        if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
            raise UserError(f'{path}: not a training state written by this trainer')
        return state

    def _load_weights(self, state_dict: dict, source: str) -> None:
        """Strict load into the wrapper; a mismatch is a UserError naming the keys, before any change."""
        import model as model_pkg

        check = getattr(model_pkg, 'check_state_fits', None)
        if check is not None:
            check(self.model, state_dict, source)
        try:
            self.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise UserError(f'{source}: does not fit --model {self.args.model} with these flags '
                            f'({" ".join(first[1:3]) if len(first) > 1 else first[0]})') from None

    def _resume_everywhere(self) -> None:
        """--load under torchrun: rank 0 reads the experiment folder (the others may not see it) and
        broadcasts the state; a problem it finds is raised on every process with its message."""
        if self.world_size == 1:
            self._resume()
            return
        problem = None
        if self.rank == 0:
            try:
                self._resume()
            except UserError as e:
                problem = str(e)
        problem = utility.broadcast_object(problem)
        if problem is not None:
            raise utility.RankZeroError(problem)
        # Weights: tensor broadcasts straight into the parameters (the backend's own collective).
        with torch.no_grad():
            utility.broadcast_tensors(self.model.state_dict().values())
        shared = None
        if self.rank == 0:
            shared = {'epoch': self.epoch, 'history': self.history, 'log_marks': self.log_marks,
                      'error_last': self.error_last}
            if self.optimizer is not None:
                shared.update(optimizer=_to_cpu(self.optimizer.state_dict()),
                              scheduler=self.scheduler.state_dict(), loss=_to_cpu(self.loss.state()),
                              scaler=self.scaler.state_dict())
        shared = utility.broadcast_object(shared)
        if self.rank != 0:
            self.epoch, self.history = shared['epoch'], shared['history']
            self.log_marks, self.error_last = shared['log_marks'], shared['error_last']
            if self.optimizer is not None:
                self.optimizer.load_state_dict(shared['optimizer'])
                self.scheduler.load_state_dict(shared['scheduler'])
                self.loss.load(shared['loss'], epochs=len(shared['loss']['log']))
                if shared['scaler']:
                    self.scaler.load_state_dict(shared['scaler'])

    def _resume(self) -> None:
        """--load NAME: weights from optimizer.pt (--resume -1 or 0) or model/model_N.pt (--resume N)."""
        args, ckp = self.args, self.ckp
        state = self._load_state_file()
        resume = args.resume
        if resume > 0:
            path = ckp.path('model', f'model_{resume}.pt')
            per_scale = list(ckp.path('model').glob(f'model_{resume}_x*.pt'))  # several single-scale nets
            if not path.is_file() and not per_scale:
                have = sorted(p.name for p in ckp.path('model').glob('model_*.pt'))
                raise UserError(f'--resume {resume}: {path} does not exist (have: {", ".join(have) or "none"}; '
                                'per-epoch files need --save_models)')
            self.model.load_state(path)
            epoch = resume
        elif state is not None:
            self._load_weights(state['model'], str(ckp.path(utility.STATE_FILE)))
            epoch = state['epoch']
        else:
            path = ckp.path('model', 'model_latest.pt')
            if not path.is_file() and not list(ckp.path('model').glob('model_latest_x*.pt')):
                raise UserError(f'--load {args.load}: neither {utility.STATE_FILE} nor model/model_latest.pt '
                                f'in {ckp.dir}')
            self.model.load_state(path)
            epoch = 0
        self.epoch = epoch
        if state is not None and state['epoch'] >= epoch:
            self.history = [r for r in state['history'] if r['epoch'] <= epoch]

        if args.test_only:
            ckp.write_log(f'Evaluating experiment {args.load} at epoch {epoch}')
            return

        if state is not None and state['epoch'] == epoch and state.get('optimizer_name') == args.optimizer:
            self.optimizer.load_state_dict(state['optimizer'])
            self.scheduler.load_state_dict(state['scheduler'])
            self.error_last = state['error_last']
            if state.get('scaler') and self.scaler.is_enabled():
                self.scaler.load_state_dict(state['scaler'])
            note = f'Resumed at epoch {epoch} (learning rate {self.lr():.2e})'
        else:
            # Only the latest epoch's optimizer moments are kept: start them afresh on the scheduled LR.
            for _ in range(epoch):
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore', UserWarning)
                    self.scheduler.step()
            source = f'model_{epoch}.pt' if resume > 0 else 'the latest weights'
            note = (f'Resumed at epoch {epoch} from {source} with fresh {args.optimizer} moments '
                    f'(learning rate {self.lr():.2e})')
        # Later flags may change the schedule from here on; the LR reached so far is kept as it was.
        if sorted(self.scheduler.milestones.elements()) != sorted(args.decay_milestones) \
                or self.scheduler.gamma != args.gamma:
            self.scheduler.milestones = Counter(args.decay_milestones)
            self.scheduler.gamma = args.gamma
            note += f'; schedule now --decay {args.decay} --gamma {args.gamma:g}'
        if state is not None:
            if state['epoch'] >= epoch:
                self.loss.load(state['loss'], epochs=epoch)
                self.log_marks = list(state['log_marks'][:epoch])
            if self.log_marks and len(self.log_marks) == epoch:
                ckp.rewind_log(self.log_marks[-1], note)
                return
        ckp.write_log(note)

    def terminate(self) -> bool:
        """True when training is over; with --test_only, evaluates once and stops."""
        if self.args.test_only:
            self.test()
            return True
        return self.epoch >= self.args.epochs


def _to_cpu(obj: object) -> object:
    """A copy of nested dicts/lists with every tensor on the CPU (to pickle it for a broadcast)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
