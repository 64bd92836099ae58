"""Command-line options: the published EDSR/HSPAN/MSNLAN flags (same names and defaults) plus validation.

Nothing is parsed at import time: `parse(argv)` is called from main() (and from tests), so worker
processes started with `spawn` can import every module safely.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nlsr import template
from nlsr.cli import ArgumentParser
from nlsr.config import Config, normalised, with_checkpoint
from nlsr.errors import UserError

if TYPE_CHECKING:
    from nlsr.model.checkpoint import Configured


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description='Single-image super-resolution with non-local attention (HSPAN, MSNLAN, EDSR).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--debug', action='store_true', help='show full tracebacks for user errors')
    p.add_argument('--template', default='.',
                   help='preset configuration, the published defaults of a network: HSPAN, MSNLAN (or MSDSN), '
                        'EDSR, EDSR_paper, RCAN, HAN, SAN, RDN, DDBPN, MDSR, NLSN, CSNLN, PAEDSR')

    g = p.add_argument_group('hardware')
    g.add_argument('--n_threads', type=int, default=18,
                   help='data-loading worker processes (capped at the CPU count; 0 loads in the main process)')
    g.add_argument('--cpu', action='store_true', help='use the CPU even when CUDA is available')
    g.add_argument('--n_GPUs', type=int, default=1, help='GPUs for DataParallel (single process)')
    g.add_argument('--seed', type=int, default=1, help='random seed')
    g.add_argument('--dist_timeout', type=int, default=600,
                   help='torchrun: seconds any collective waits for a peer before the run stops (a dead peer '
                        'never hangs the job)')

    g = p.add_argument_group('data')
    g.add_argument('--dir_data', type=str, default='../../', help='dataset root directory')
    g.add_argument('--dir_demo', type=str, default='../Demo', help='folder of LR images for --data_test Demo')
    g.add_argument('--data_train', type=str, default='DIV2K', help="training sets, '+'-separated")
    g.add_argument('--data_test', type=str, default='DIV2K', help="test sets, '+'-separated")
    g.add_argument('--data_range', type=str, default='1-800/801-810', help='DIV2K train/test index ranges')
    g.add_argument('--dir_cache', type=str, default='',
                   help="folder for the decoded-image cache ('': <dataset>/bin, or ~/.cache/sr-data-cache "
                        'when the dataset folder is read-only)')
    g.add_argument('--ext', type=str, default='sep', choices=('img', 'sep', 'sep_reset'),
                   help='img: decode images every time; sep: cache decoded images as .npy; '
                        'sep_reset: rebuild that cache')
    g.add_argument('--scale', type=str, default='4', help="upscaling factors, '+'-separated (e.g. 2+3+4)")
    g.add_argument('--patch_size', type=int, default=192, help='HR training patch size')
    g.add_argument('--rgb_range', type=int, default=255, help='maximum pixel value seen by the network')
    g.add_argument('--n_colors', type=int, default=3, choices=(1, 3), help='1 (Y channel) or 3 (RGB)')
    g.add_argument('--chop', action='store_true',
                   help="test-time forward on overlapping quarters (the model's published forward_chop)")
    g.add_argument('--no_chop', dest='chop', action='store_false', default=argparse.SUPPRESS,
                   help='no --chop (to override a --template that sets it)')
    g.add_argument('--tile', type=int, default=0,
                   help='test-time forward on LR tiles of this size with --tile_overlap (0: off)')
    g.add_argument('--tile_overlap', type=int, default=16, help='LR overlap between tiles for --tile')
    g.add_argument('--no_augment', action='store_true', help='no random flips/rotations of training patches')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='EDSR',
                   help='network name (HSPAN, MSNLAN/MSDSN, EDSR, Bicubic, RCAN, HAN, SAN, RDN, DDBPN, MDSR, NLSN, '
                        'CSNLN, PAEDSR)')
    g.add_argument('--pre_train', type=str, default='.',
                   help="checkpoint to load, .pt or .safetensors ('.' for none); '{scale}' is replaced by each "
                        'scale. A checkpoint saved by this project sets the architecture flags it was built with')
    g.add_argument('--n_resblocks', type=int, default=20, help='residual blocks per group')
    g.add_argument('--n_feats', type=int, default=64, help='feature channels')
    g.add_argument('--res_scale', type=float, default=1, help='residual scaling')
    g.add_argument('--precision', type=str, default='single', choices=('single', 'half', 'bf16'),
                   help='precision at test time: single (float32), half (float16 weights, CUDA) or bf16 '
                        '(bfloat16 autocast for the convolutions, CPU or CUDA; HSPA scores stay float32)')
    g.add_argument('--n_resgroups', type=int, default=10, help='residual groups')
    g.add_argument('--reduction', type=int, default=16, help='channel reduction of attention embeddings')
    g.add_argument('--topk', type=int, default=128, help='top-k scores from which HSPA finds its threshold')
    g.add_argument('--attention', type=str, default=None, choices=('hspa', 'softmax', 'none'),
                   help='non-local attention: hspa (soft thresholding), softmax, or none; default: the '
                        "model's published one (HSPAN hspa, MSNLAN and PAEDSR softmax, EDSR none). HSPAN: its "
                        'attention slot; EDSR: an attention after every --attention_every residual blocks; '
                        'MSNLAN, PAEDSR: the normaliser of its multi-scale or pyramid attention (hspa or softmax)')
    g.add_argument('--attention_every', type=int, default=None,
                   help='EDSR with --attention hspa|softmax: residual blocks per attention (default 8)')
    g.add_argument('--hspa_impl', type=str, default='auto', choices=('auto', 'dense', 'blocked', 'triton', 'fast'),
                   help='HSPA algorithm: auto (by device and size), blocked (exact; native kernels on the CPU), '
                        'triton (fused exact kernels, CUDA) or dense (published, N x N scores); fast: the earlier '
                        'name of blocked. MSNLAN: auto, blocked or dense for its cross-scale attention')
    g.add_argument('--G0', type=int, default=64, help='RDN: feature channels of the dense blocks')
    g.add_argument('--RDNkSize', type=int, default=3, help='RDN: kernel size')
    g.add_argument('--RDNconfig', type=str, default='B', choices=('A', 'B'),
                   help='RDN: A (20 blocks x 6 layers, growth 32) or B (16 x 8, growth 64)')
    g.add_argument('--depth', type=int, default=12, help='CSNLN: recurrent projection units')
    g.add_argument('--chunk_size', type=int, default=144, help='NLSN: positions per attention chunk')
    g.add_argument('--n_hashes', type=int, default=4, help='NLSN: hash rounds of its sparse attention')
    g.add_argument('--hspa_block', type=int, default=0,
                   help='query rows per block of the fast HSPA when training (0: automatic, about 32 MiB of '
                        "scores); MSNLAN, PAEDSR: query positions per tile of its attention (0: automatic)")

    g = p.add_argument_group('training')
    g.add_argument('--reset', action='store_true', help='delete the experiment folder and start afresh')
    g.add_argument('--test_every', type=int, default=1000, help='training batches per epoch')
    g.add_argument('--epochs', type=int, default=1000, help='epochs to train (0: no limit)')
    g.add_argument('--batch_size', type=int, default=16,
                   help='global batch size (split across processes under torchrun)')
    g.add_argument('--split_batch', type=int, default=1, help='split each test batch into this many chunks')
    g.add_argument('--self_ensemble', action='store_true', help='average the 8 flips/rotations at test time')
    g.add_argument('--test_only', action='store_true', help='evaluate only, no training')
    g.add_argument('--gan_k', type=int, default=1, help='discriminator steps per generator step')
    g.add_argument('--amp', type=str, default='off', choices=('off', 'bf16', 'fp16'),
                   help='mixed precision for training')
    g.add_argument('--accumulate', type=int, default=1,
                   help='micro-batches per optimizer step: each step sums the gradients of N forwards of '
                        '--batch_size / N patches (the same patches as one batch)')
    g.add_argument('--ema_decay', type=float, default=0,
                   help='keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); '
                        'evaluation and the model files use it')
    g.add_argument('--ema_start', type=int, default=0,
                   help='with --ema_decay: the average equals the weights until this optimizer step')
    g.add_argument('--channels_last', action='store_true',
                   help='keep weights and activations in channels-last memory order: faster convolutions on '
                        'x86 CPUs through oneDNN (speed: benchmarks/README.md); results are unchanged up to '
                        'float rounding')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the network for training and evaluation (HSPA layers stay eager; '
                        'speed: benchmarks/README.md)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--lr', type=float, default=1e-4, help='learning rate')
    g.add_argument('--decay', type=str, default='200',
                   help="epochs at which the LR is multiplied by --gamma, '-'-separated")
    g.add_argument('--gamma', type=float, default=0.5, help='learning-rate decay factor')
    g.add_argument('--lr_schedule', default='step', choices=('step', 'cosine'),
                   help='step: --decay/--gamma per epoch (published); cosine: per batch from --lr to --min_lr '
                        'over --epochs x --test_every batches')
    g.add_argument('--min_lr', type=float, default=0, help='final learning rate of --lr_schedule cosine')
    g.add_argument('--warmup', type=int, default=0, help='batches of linear learning-rate warm-up (0: none)')
    g.add_argument('--optimizer', default='ADAM', choices=('SGD', 'ADAM', 'ADAMW', 'RMSprop'),
                   help='optimizer (ADAMW: Adam with decoupled --weight_decay)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999), help='ADAM/ADAMW betas')
    g.add_argument('--epsilon', type=float, default=1e-8, help='ADAM/ADAMW epsilon')
    g.add_argument('--weight_decay', type=float, default=0, help='weight decay')
    g.add_argument('--gclip', type=float, default=0, help='gradient clipping threshold (0: none)')

    g = p.add_argument_group('loss')
    g.add_argument('--loss', type=str, default='1*L1',
                   help="weighted sum of terms, e.g. '1*L1+0.1*MSE' (L1, MSE, Charbonnier, VGG22, VGG54, GAN)")
    g.add_argument('--charbonnier_eps', type=float, default=1e-3,
                   help='eps of the Charbonnier term, mean(sqrt((sr - hr)^2 + eps^2)), in --rgb_range units')
    g.add_argument('--skip_threshold', type=float, default=1e8,
                   help='skip a batch whose loss exceeds this multiple of the previous epoch mean')
    g.add_argument('--max_skips', type=int, default=100,
                   help='stop the run after this many consecutive skipped batches (non-finite or over '
                        '--skip_threshold); the last checkpoint stays intact')

    g = p.add_argument_group('log')
    g.add_argument('--save', type=str, default='test', help='experiment name: experiment/<save>/')
    g.add_argument('--load', type=str, default='', help='experiment to continue: experiment/<load>/')
    g.add_argument('--resume', type=int, default=0,
                   help='with --load: -1 resumes from model_latest.pt, N from model_N.pt')
    g.add_argument('--save_models', action='store_true', help='keep a checkpoint of every epoch')
    g.add_argument('--save_format', default='pt', choices=('pt', 'safetensors', 'bare_pt'),
                   help="model files in experiment/<save>/model/: pt ({'config', 'state_dict'}), safetensors "
                        '(configuration in the metadata), or bare_pt (a plain state dict, the published layout, '
                        'without the configuration)')
    g.add_argument('--print_every', type=int, default=100,
                   help='batches between training log lines and loss_curve.csv rows')
    g.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard scalars (loss terms, learning rate, PSNR/SSIM, seconds per batch) '
                        'to experiment/<save>/tb/ (needs the tensorboard package)')
    g.add_argument('--save_results', action='store_true', help='save SR images')
    g.add_argument('--save_gt', action='store_true', help='also save the LR and HR images')
    return p


def given_flags(argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations of the flags written on the command line (defaults and templates excluded)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def build(argv: Sequence[str] | None = None) -> tuple[Config, Configured]:
    """The run's configuration, built once (config.py: the command line, the --template preset, the --pre_train
    checkpoint's configuration; validated, frozen), and the checkpoint file it read (for model.Model)."""
    return with_checkpoint(parse_flags(argv), flag_type, AT_LEAST, check_model_flags=True)


def parse(argv: Sequence[str] | None = None) -> Config:
    """build's configuration, model flags unchecked (model.Model checks them)."""
    return with_checkpoint(parse_flags(argv), flag_type, AT_LEAST, check_model_flags=False)[0]


def parse_flags(argv: Sequence[str] | None) -> Config:
    """The command line over the template's values over the defaults, validated (no file is read)."""
    parsed = build_parser().parse_args(argv)
    given = given_flags(argv)
    args = argparse.Namespace(**{**vars(parsed), **template.preset(parsed.template, given), 'cli_flags': given})
    args = Config(**{**vars(args), **normalised(args)})
    if args.template != '.' and not template.template_values(args.template):
        raise UserError(f'--template {args.template}: unknown; known: {", ".join(template.known_names())}')
    validate(args)
    return args


def flag_type(dest: str) -> type | None:
    """The type a flag's value is parsed to (int, float, str), or None (switches, --model, unknown names)."""
    return next((a.type for a in build_parser()._actions if a.dest == dest), None)


# The smallest value of each integer flag that a run can use.
AT_LEAST = {'patch_size': 1, 'batch_size': 1, 'test_every': 1, 'rgb_range': 1, 'n_feats': 1, 'print_every': 1,
            'n_resgroups': 1, 'n_resblocks': 0, 'reduction': 1, 'topk': 1, 'hspa_block': 0, 'tile': 0,
            'tile_overlap': 0, 'split_batch': 1, 'n_GPUs': 1, 'gan_k': 1, 'warmup': 0, 'n_threads': 0,
            'epochs': 0, 'resume': -1, 'dist_timeout': 1, 'max_skips': 1, 'accumulate': 1, 'ema_start': 0,
            'G0': 1, 'RDNkSize': 1, 'depth': 1, 'chunk_size': 1, 'n_hashes': 1, 'seed': 0, 'attention_every': 1}
# The largest: no size, count or number of seconds a run reaches exceeds INT_MAX, which keeps products of flags
# within 64-bit integers; --seed is a 64-bit number to which the trainer adds epochs and ranks.
AT_MOST = {'seed': 2**63 - 1}
INT_MAX = 2**31 - 1
# What each floating-point flag takes besides being finite (a kind of FLOAT_KINDS).
FLOAT_RANGE = {'res_scale': 'any', 'lr': 'positive', 'gamma': 'positive', 'epsilon': 'positive',
               'skip_threshold': 'positive', 'charbonnier_eps': 'positive', 'min_lr': 'non-negative',
               'momentum': 'non-negative', 'weight_decay': 'non-negative', 'gclip': 'non-negative',
               'ema_decay': 'fraction', 'betas': 'fraction'}
FLOAT_KINDS: dict[str, tuple[Callable[[float], bool], str]] = {
    'positive': (lambda v: v > 0, 'a positive number'), 'non-negative': (lambda v: v >= 0, '0 or a positive number'),
    'fraction': (lambda v: 0 <= v < 1, 'a number in [0, 1)'), 'any': (lambda v: True, 'a finite number')}


def validate(args: argparse.Namespace) -> None:
    """Refuse values no run can use, naming the flag, whether or not this run reads them (combinations a
    network cannot use are refused where it is built: model/<name>.make_model)."""
    _check_numbers(args)
    for check in TEXT_CHECKS.values():
        check(args)
    from nlsr import distributed

    distributed.check_batch_split(args.batch_size, args.accumulate, 1)
    if args.accumulate > 1 and any(t.name == 'GAN' for t in _loss_terms(args)):
        raise UserError(f'--accumulate {args.accumulate}: the GAN term steps its discriminator at every forward; '
                        'train it without --accumulate')
    if args.min_lr > args.lr:
        raise UserError(f'--min_lr {args.min_lr}: expected 0 <= min_lr <= --lr {args.lr}')
    if args.tile and args.chop:
        raise UserError('--chop and --tile are two ways to cut the test input: choose one (--no_chop drops a '
                        "template's --chop)")
    if args.tile and args.tile_overlap >= args.tile:
        raise UserError(f'--tile_overlap {args.tile_overlap}: expected less than --tile {args.tile}')
    if args.lr_schedule == 'cosine' and args.epochs >= int(1e8):
        raise UserError('--lr_schedule cosine needs --epochs > 0: the curve spans --epochs x --test_every batches')
    if args.model.lower() == 'bicubic' and not args.test_only:
        raise UserError('--model Bicubic has no parameters to train: add --test_only')
    if args.attention_every is not None and args.model.lower() != 'edsr':
        raise UserError(f'--attention_every {args.attention_every}: only --model EDSR places attentions by it')
    if args.attention is not None and args.model.lower() == 'bicubic':
        raise UserError(f'--attention {args.attention}: --model Bicubic has no attention')
    if args.RDNkSize % 2 == 0:
        raise UserError(f'--RDNkSize {args.RDNkSize}: expected an odd kernel size (an even one changes the '
                        'image size)')
    if args.resume != 0 and not args.load:
        raise UserError(f'--resume {args.resume} needs --load <experiment name> to say what to resume')
    if not args.test_only and 'GAN' in str(args.loss).upper():
        _refuse_gan_under_torchrun(args.loss)
    if args.tensorboard:
        from nlsr.runs.tensorboard_log import check_available

        check_available()
    # A training run cuts patches at every scale; --patch_size written for an evaluation is checked alike.
    if not args.test_only or 'patch_size' in getattr(args, 'cli_flags', ()):
        for s in args.scale:
            if args.patch_size % s:
                raise UserError(f'--patch_size {args.patch_size} is not a multiple of --scale {s}')


def _check_numbers(args: argparse.Namespace) -> None:
    """Integer flags within [AT_LEAST, AT_MOST or INT_MAX]; floating-point flags finite and in FLOAT_RANGE."""
    for flag, low in AT_LEAST.items():
        value, high = getattr(args, flag), AT_MOST.get(flag, INT_MAX)
        if value is not None and not low <= value <= high:  # None: the model's choice (--attention_every)
            raise UserError(f'--{flag} {value}: expected an integer {f">= {low}" if value < low else f"<= {high}"}')
    for flag, kind in FLOAT_RANGE.items():
        values = tuple(getattr(args, flag)) if flag == 'betas' else (getattr(args, flag),)
        fits, expected = FLOAT_KINDS[kind]
        shown = ' '.join(map(str, values))
        if not all(math.isfinite(v) for v in values):
            raise UserError(f'--{flag} {shown}: expected {"finite numbers" if len(values) > 1 else "a finite number"}')
        if not all(fits(v) for v in values):
            raise UserError(f'--{flag} {shown}: expected {"two numbers in [0, 1)" if len(values) > 1 else expected}')


def _folder_flag(flag: str, value: str, optional: bool = False) -> None:
    """A folder path: not empty (unless optional, where '' means the default) and not an existing file."""
    if value == '':
        if optional:
            return
        raise UserError(f"--{flag} '': expected a folder path ('.' for the current folder)")
    if os.path.exists(value) and not os.path.isdir(value):
        raise UserError(f'--{flag} {value}: exists and is not a folder; expected a folder')


def _experiment_name(flag: str, value: str) -> None:
    """--save and --load name a folder directly under the experiment root."""
    if not value or Path(value).name != value or value in ('.', '..'):
        raise UserError(f'--{flag} {value!r}: expected a plain folder name (experiment/<name>/)')


def _check_pre_train(args: argparse.Namespace) -> None:
    if str(args.pre_train) in ('', '.'):
        return
    for s in args.scale:
        path = str(args.pre_train).replace('{scale}', str(s))
        if os.path.isdir(path):
            raise UserError(f'--pre_train {path}: is a folder; expected a checkpoint file (.pt or .safetensors)')


def _check_data_train(args: argparse.Namespace) -> None:
    if not args.data_train:
        raise UserError('--data_train: expected at least one dataset name')
    if any(name.lower() == 'demo' for name in args.data_train):
        raise UserError('--data_train Demo: Demo images have no ground truth; use it with --data_test')


def _check_scale(args: argparse.Namespace) -> None:
    if len(set(args.scale)) < len(args.scale):
        raise UserError(f'--scale {"+".join(map(str, args.scale))}: expected each scale once')
    if max(args.scale) > INT_MAX:
        raise UserError(f'--scale {max(args.scale)}: expected an integer <= {INT_MAX}')


def _check_decay(args: argparse.Namespace) -> None:
    for epoch in args.decay_milestones:
        if not 1 <= epoch <= INT_MAX:
            raise UserError(f"--decay {args.decay}: expected epochs from 1 separated by '-'")


def _check_data_range(args: argparse.Namespace) -> None:
    from nlsr.data.div2k import data_ranges

    data_ranges(args.data_range)


def _check_model(args: argparse.Namespace) -> None:
    from nlsr.model.registry import resolve_model_name

    resolve_model_name(args.model)


def _loss_terms(args: argparse.Namespace) -> list:
    from nlsr.loss import parse_loss

    return parse_loss(args.loss)


# The checks of the text flags, each run whether or not this run reads the flag. --template is checked by
# parse() before its values apply; flags with choices are checked by argparse.
TEXT_CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    'dir_data': lambda a: _folder_flag('dir_data', a.dir_data),
    'dir_demo': lambda a: _folder_flag('dir_demo', a.dir_demo),
    'dir_cache': lambda a: _folder_flag('dir_cache', a.dir_cache, optional=True),
    'data_train': _check_data_train,
    'data_test': lambda a: None,  # parse() refuses an empty list; each name is a folder found when the run starts
    'data_range': _check_data_range,
    'scale': _check_scale,
    'model': _check_model,
    'pre_train': _check_pre_train,
    'decay': _check_decay,
    'loss': _loss_terms,
    'save': lambda a: _experiment_name('save', a.save),
    'load': lambda a: a.load and _experiment_name('load', a.load),
}


def _refuse_gan_under_torchrun(spec: str) -> None:
    """The GAN term trains its own discriminator in each process: refused in a torchrun job (every process
    refuses alike, so rank 0 alone reports it)."""
    from nlsr import distributed, loss

    if distributed.torchrun_env() is not None and any(t.name == 'GAN' for t in loss.parse_loss(spec)):
        raise distributed.RankZeroError(f'--loss {spec}: the GAN term trains its own discriminator per process, '
                                        'which torchrun would let drift apart; train it in a single process')
