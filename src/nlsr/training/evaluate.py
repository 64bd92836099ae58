"""Evaluation: every test set at every scale, scored per image, gathered across processes, best tracked.

Under torchrun each process scores its share of the test images (the loaders' samplers deal them out);
the per-image scores are gathered in dataset order, so the means equal a single process's, and result
images travel to rank 0, the only writer, one round at a time.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch
from tqdm import tqdm

from nlsr import distributed
from nlsr.errors import UserError
from nlsr.imageops import metrics
from nlsr.imageops.color import rgb_to_gray
from nlsr.runs.experiment import Experiment
from nlsr.runs.records import HistoryEntry, ImageScore, SetResult
from nlsr.runs.timer import Timer
from nlsr.training.seeding import image_seed


def summarise(name: str, scale: int, scores: list[ImageScore], seconds: float, epoch: int) -> SetResult:
    """Mean PSNR/SSIM over the images that have them."""
    psnrs = [s.psnr for s in scores if s.psnr is not None]
    ssims = [s.ssim for s in scores if s.ssim is not None]
    return SetResult(name, scale, sum(psnrs) / len(psnrs) if psnrs else None,
                     sum(ssims) / len(ssims) if ssims else None, len(scores), round(seconds, 3), epoch)


class Evaluator:
    """Runs the test loaders through the model's evaluation forwards and keeps the history of scores."""

    def __init__(self, args: argparse.Namespace, loaders: list, model: torch.nn.Module, experiment: Experiment,
                 progress: bool) -> None:
        self.args = args
        self.loaders = loaders
        self.model = model
        self.exp = experiment
        self.progress = progress
        self.device = model.device
        self.history: list[HistoryEntry] = []

    def best(self, dataset: str, scale: int) -> tuple[float, int] | None:
        """(best PSNR, its epoch) of a test set and scale; the earliest epoch wins ties."""
        rows = [r for r in self.history if r.dataset == dataset and r.scale == scale and r.psnr is not None]
        if not rows:
            return None
        best = max(rows, key=lambda r: (r.psnr, -r.epoch))
        return best.psnr, best.epoch

    def run(self, epoch: int, weights: str = '') -> bool:
        """Evaluate everything at `epoch`; write results.json and the log (`weights` names the weights
        evaluated, e.g. 'EMA weights'). True when the first test set at the first scale reached a new best PSNR."""
        self.exp.write_log('\nEvaluation:' + (f' {weights}' if weights else ''))
        self.model.eval()
        timer_all = Timer()
        results: list[SetResult] = []
        is_best = False
        with torch.no_grad():
            for idx_data, loader in enumerate(self.loaders):
                ds = loader.dataset
                # Dataset indices of this process's images, in loader order (all of them in one process).
                positions = list(iter(loader.sampler))
                rounds = max(distributed.all_gather_objects(len(positions)))
                for idx_scale, scale in enumerate(self.args.scale):
                    ds.set_scale(idx_scale)
                    timer = Timer()
                    scores = self._score_set(loader, ds, idx_scale, scale, positions, rounds)
                    result = summarise(ds.name, scale, scores, timer.toc(), epoch)
                    results.append(result)
                    if idx_data == 0 and idx_scale == 0 and result.psnr is not None:
                        previous = self.best(ds.name, scale)
                        is_best = previous is None or result.psnr > previous[0]
                    self.history.append(HistoryEntry(epoch, ds.name, scale, result.psnr, result.ssim))
                    self.exp.write_log(self._result_line(result))
        self.exp.write_results([asdict(r) for r in results])
        self.exp.write_log(f'Forward: {timer_all.toc():.2f}s\n')
        return is_best

    def _score_set(self, loader: object, ds: object, idx_scale: int, scale: int, positions: list[int],
                   rounds: int) -> list[ImageScore]:
        """All processes' per-image scores of one test set at one scale, in dataset order."""
        mine: list[tuple[int, ImageScore]] = []
        for item in tqdm(loader, desc=f'{ds.name} x{scale}', ncols=100, leave=False,  # data.common.TestItem
                         disable=not self.progress, file=sys.stdout):
            stem = item.name[0] if isinstance(item.name, (list, tuple)) else str(item.name)
            chunks = item.lr.to(self.device).chunk(max(1, self.args.split_batch), dim=0)
            seed = image_seed(self.args.seed, stem)  # the image's own draws (networks with random draws)
            sr = torch.cat([self.model(c, idx_scale, seed=seed) for c in chunks], dim=0)
            score, images = self._score(ds, scale, item.lr, item.hr, sr, stem)
            self._write_images(ds.name, scale, (stem, images))
            mine.append((positions[len(mine)], score))
        for _ in range(rounds - len(mine)):  # a process with fewer images still takes part in each round
            self._write_images(ds.name, scale, None)
        pairs = [p for part in distributed.all_gather_objects(mine) for p in part]
        return [score for _, score in sorted(pairs, key=lambda p: p[0])]

    def _write_images(self, dataset: str, scale: int, item: tuple[str, list] | None) -> None:
        """Result images of one round (one image per process at most), written by rank 0 alone.

        Every process calls this once per round, with None when it has no image left, so the gather
        pairs up; rank 0 never holds a whole test set.
        """
        if not (self.args.save_results or self.args.save_gt):
            return
        for got in distributed.gather_to_main(item) or []:
            if got is None:
                continue
            stem, images = got
            for tag, img in images:
                self.exp.save_image(dataset, stem, scale, tag, img)

    def _score(self, ds: object, scale: int, lr_img: torch.Tensor, hr: torch.Tensor, sr: torch.Tensor,
               stem: str) -> tuple[ImageScore, list]:
        """The scores of one image and the (tag, image) pairs to save."""
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
                sr_m, hr_m = rgb_to_gray(sr_img), hr_img[..., :1]
            psnr = metrics.psnr(sr_m, hr_m, crop_border=scale)
            ssim = metrics.ssim(sr_m, hr_m, crop_border=scale)
        images = []
        if args.save_results:
            images.append(('SR', sr_img))
        if args.save_gt:
            images.append(('LR', metrics.tensor_to_image(lr_img[0].float().cpu(), args.rgb_range)))
            if hr_img is not None:
                images.append(('HR', hr_img))
        return ImageScore(stem, psnr, ssim), images

    def _result_line(self, r: SetResult) -> str:
        head = f'[{r.dataset} x{r.scale}]'
        if r.psnr is None:
            return f'{head}  no ground truth: {r.images} images super-resolved'
        best = self.best(r.dataset, r.scale)
        best_psnr, best_epoch = best if best is not None else (r.psnr, r.epoch)
        return f'{head}  PSNR: {r.psnr:.3f}  SSIM: {r.ssim:.4f}  (Best: {best_psnr:.3f} @epoch {best_epoch})'

    def psnr_table(self, epochs: int) -> torch.Tensor:
        """psnr_log.pt as published: epochs x test sets x scales (NaN where a cell was not evaluated)."""
        names = [loader.dataset.name for loader in self.loaders]
        scales = list(self.args.scale)
        table = torch.full((epochs, len(names), len(scales)), float('nan'))
        for r in self.history:
            if r.psnr is not None and 1 <= r.epoch <= epochs and r.dataset in names and r.scale in scales:
                table[r.epoch - 1, names.index(r.dataset), scales.index(r.scale)] = r.psnr
        return table
