"""Model registry and the `Model` wrapper (EDSR shape): build, place, load, save, test-time forwards.

A model is one file `src/model/<name>.py` with `make_model(args) -> nn.Module`; `--model` picks it
case-insensitively (alias MSDSN -> msnlan). The wrapper owns the device, DataParallel, strict checkpoint
loading, atomic saving, and the evaluation-time forwards: --chop (published forward_chop), --tile,
--self_ensemble and --precision half.

Under torchrun (an initialised process group of several processes) each process drives cuda:LOCAL_RANK (or
the CPU) and training forwards go through DistributedDataParallel, which averages gradients across processes
in backward; evaluation forwards use the plain network, so processes evaluating different images never wait
on each other.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from errors import UserError
from fileio import atomic_torch_save

ALIASES = {'msdsn': 'msnlan'}
# Checkpoint containers: a state dict is looked for under these keys, in this order.
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict', 'model')
# Model files this project reads, in the order they are looked for.
CHECKPOINT_SUFFIXES = ('.pt', '.safetensors')
# The published HSPAN forward_chop: overlap 10 LR pixels, split further while a quarter has >= 120000
# pixels, quarter height/width rounded up to the next multiple of 4 / 8 (always adding at least 1).
HSPAN_CHOP = {'shave': 10, 'min_size': 120000, 'h_mult': 4, 'w_mult': 8}
_MAKE_MODEL = re.compile(r'^def make_model\(', re.MULTILINE)

Forward = Callable[[torch.Tensor], torch.Tensor]


def _distributed() -> bool:
    """True inside a torchrun job of more than one process (process group initialised)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- registry

def registered_models() -> list[str]:
    """Names of the modules in this package that define make_model (found by file, not hard-coded)."""
    names = []
    for path in sorted(Path(__file__).resolve().parent.glob('*.py')):
        if path.stem.startswith('_'):
            continue
        try:
            if _MAKE_MODEL.search(path.read_text(encoding='utf-8')):
                names.append(path.stem)
        except OSError:
            continue
    return names


def resolve_model_name(name: str) -> str:
    """Module name for --model `name` (case-insensitive, aliases applied); UserError listing the choices."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    names = registered_models()
    if key not in names:
        aliases = [f'{a} (= {t})' for a, t in sorted(ALIASES.items()) if t in names]
        raise UserError(f'--model {name}: unknown model; registered: {", ".join(names + aliases)}')
    return key


def make_network(args: argparse.Namespace) -> nn.Module:
    """The plain network named by args.model, built by its module's make_model(args)."""
    return import_module(f'model.{resolve_model_name(args.model)}').make_model(args)


# ---------------------------------------------------------------- checkpoints

def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint object: bare, or under one of WRAPPER_KEYS (nested wrappers are
    unwrapped too); 'module.' prefixes (DataParallel/DDP) are stripped."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = {}
            for key, value in obj.items():
                key = str(key)
                while key.startswith('module.'):
                    key = key[len('module.'):]
                state[key] = value
            return state
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    raise UserError(f'{source}: no state dict found (expected a dict of tensors, bare or under one of '
                    f'{", ".join(repr(k) for k in WRAPPER_KEYS)})')


def read_state_dict(path: str | Path, flag: str = '--pre_train') -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely (weights_only) and return its state dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'{flag} {path}: no such file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # unpickling errors come in many types; the user needs the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{flag} {path}: cannot read it as a PyTorch weights file ({first})') from e
    return unwrap_state_dict(obj, f'{flag} {path}')


def _few(items: list[str], limit: int = 6) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', ... (+{len(items) - limit} more)' if len(items) > limit else '')


def likely_cause(net: nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """Best guess at why `state` does not fit `net`, from the configuration each set of keys implies
    (the network class's infer_config), else from how many keys the two share."""
    infer = getattr(type(net), 'infer_config', None)
    if infer is not None:
        try:
            mine, theirs = infer(own), infer(state)
        except Exception:  # a foreign layout can break the inference; fall back to the generic hints
            mine, theirs = {}, {}
        if mine and not theirs:
            return f'the checkpoint is not laid out like {type(net).__name__}: a checkpoint of a different --model?'
        diffs = [f'--{k} {theirs[k]} (built with {mine[k]})' for k in mine
                 if theirs.get(k) not in (None, 0, '') and theirs[k] != mine[k]]
        if diffs:
            return 'the checkpoint looks like ' + ', '.join(diffs)
    common_keys = len(set(own) & set(state))
    if common_keys < 0.5 * min(len(own), len(state)):
        return (f'only {common_keys} of {len(state)} checkpoint keys exist in {type(net).__name__}: '
                'a checkpoint of a different --model?')
    return 'a different configuration (--scale, --n_feats, --n_resgroups, --n_resblocks, --reduction, ...)'


def check_state_fits(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one UserError naming missing, unexpected and shape-mismatched keys when `state` does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k} checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return
    parts = [f'{source} does not fit {type(net).__name__}']
    if missing:
        parts.append(f'{len(missing)} missing keys: {_few(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys: {_few(unexpected)}')
    if mismatched:
        parts.append(f'{len(mismatched)} shape mismatches: {_few(mismatched)}')
    parts.append(f'likely cause: {likely_cause(net, own, state)}')
    raise UserError('; '.join(parts))


def load_into(net: nn.Module, path: str | Path, flag: str = '--pre_train') -> None:
    """Strictly load the checkpoint at `path` into `net`, refusing (UserError) before changing anything."""
    state = read_state_dict(path, flag)
    check_state_fits(net, state, f'{flag} {path}')
    net.load_state_dict(state, strict=True)


def plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict on the CPU, without 'module.' prefixes."""
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------- tiling helpers

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with overlaps of at least `overlap`,
    spread evenly (first at 0, last flush with the end)."""
    if length <= tile:
        return [0]
    count = -(-(length - overlap) // (tile - overlap))
    span = length - tile
    return [(i * span + (count - 1) // 2) // (count - 1) for i in range(count)]


def tile_weights(starts: list[int], length: int, tile: int, overlap: int, scale: int) -> list[torch.Tensor]:
    """Blending weights (HR pixels, float64) of each tile along one axis.

    Between two neighbours the weight ramps linearly over a band of overlap/2 LR pixels centred in their
    overlap (a hard cut for overlap < 4), and the weights of the two sum to one. A tile therefore never
    contributes within overlap/4 LR pixels of its inner edges, so a network whose receptive-field radius
    is at most overlap/4 LR pixels gives exactly its untiled output.
    """
    size = min(tile, length)
    # Half-width of the band: overlap/4 LR pixels, less if neighbouring cuts are closer than a band.
    min_step = min((b - a for a, b in zip(starts, starts[1:], strict=False)), default=size)
    band = scale * min(overlap // 4, min_step // 2)
    out = []
    for i, a in enumerate(starts):
        centre = torch.arange(scale * a, scale * (a + size), dtype=torch.float64) + 0.5
        w = torch.ones_like(centre)
        if i > 0:
            cut = scale * (a + starts[i - 1] + size) / 2
            w *= ((centre - cut + band) / (2 * band)).clamp(0, 1) if band else (centre >= cut).double()
        if i + 1 < len(starts):
            cut = scale * (starts[i + 1] + a + size) / 2
            w *= ((cut + band - centre) / (2 * band)).clamp(0, 1) if band else (centre < cut).double()
        out.append(w)
    return out


# ---------------------------------------------------------------- the wrapper

class Model(nn.Module):
    """The network named by --model, on its device, with checkpoint I/O and test-time forwards.

    With several --scale values and a single-scale network, one network per scale is built and
    `forward(lr, idx_scale)` uses the one for that scale; `.model` is the network of the current scale.
    """

    def __init__(self, args: argparse.Namespace, log: Callable[[str], Any] = print) -> None:
        super().__init__()
        self.log = log
        self.name = resolve_model_name(args.model)
        self.scales = [int(s) for s in args.scale]
        self.idx_scale = 0
        self.self_ensemble = bool(getattr(args, 'self_ensemble', False))
        self.chop = bool(getattr(args, 'chop', False))
        self.tile = int(getattr(args, 'tile', 0) or 0)
        self.tile_overlap = int(getattr(args, 'tile_overlap', 16) or 0)
        self.save_models = bool(getattr(args, 'save_models', False))
        if self.tile < 0:
            raise UserError(f'--tile {self.tile}: expected 0 (off) or a tile size in LR pixels')
        if self.tile and not 0 <= self.tile_overlap < self.tile:
            raise UserError(f'--tile_overlap {self.tile_overlap}: expected 0 <= overlap < --tile {self.tile}')
        if self.tile and self.chop:
            log('--tile is set: it replaces --chop for test-time forwards')

        self.device = self._choose_device(args, log)
        module = import_module(f'model.{self.name}')
        first = module.make_model(args)
        if hasattr(first, 'set_scale') or len(self.scales) == 1:
            nets = [first]
        else:  # single-scale networks: one per scale (its own upsampler and weights)
            nets = [first]
            for s in self.scales[1:]:
                scaled = argparse.Namespace(**vars(args))
                scaled.scale = [s]
                nets.append(module.make_model(scaled))
        self.nets = nn.ModuleList(nets)
        for i, net in enumerate(self.nets):
            self._log_network(net, self.scales[i] if len(self.nets) > 1 else None)

        self._load_pre_train(str(getattr(args, 'pre_train', '.') or '.'))
        self.nets.to(self.device)

        # --precision half: CUDA only. Evaluation-only runs convert the weights (published behaviour, half
        # the memory); training runs keep float32 weights and evaluate under float16 autocast.
        want_half = getattr(args, 'precision', 'single') == 'half'
        self.half_weights = want_half and self.device.type == 'cuda' and bool(getattr(args, 'test_only', False))
        self.autocast_half = want_half and self.device.type == 'cuda' and not self.half_weights
        if want_half and self.device.type != 'cuda':
            log('--precision half needs CUDA: evaluating in float32 on the CPU')
        if self.half_weights:
            self.nets.half()

        n_gpus = int(getattr(args, 'n_GPUs', 1) or 1)
        self.n_parallel = 1
        self._runners: list[nn.Module] = list(self.nets)  # plain list: DataParallel must not re-register
        if self.device.type == 'cuda' and n_gpus > 1:
            if n_gpus > torch.cuda.device_count():
                raise UserError(f'--n_GPUs {n_gpus}: only {torch.cuda.device_count()} CUDA devices are visible')
            self.n_parallel = n_gpus
            self._runners = [nn.DataParallel(net, device_ids=list(range(n_gpus))) for net in self.nets]
        # Training forwards: DDP under torchrun. Its construction broadcasts rank 0's weights, so every process
        # starts equal; the plain list keeps 'module.' out of the wrapper's state dict.
        self._train_runners: list[nn.Module] = self._runners
        trainable = any(p.requires_grad for p in self.nets.parameters())
        if _distributed() and trainable and not getattr(args, 'test_only', False):
            if self.n_parallel > 1:
                raise UserError(f'--n_GPUs {n_gpus} cannot be combined with torchrun: drop --n_GPUs')
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self._train_runners = [nn.parallel.DistributedDataParallel(net, device_ids=ids) for net in self.nets]

    # ---- set-up helpers

    @staticmethod
    def _choose_device(args: argparse.Namespace, log: Callable[[str], Any]) -> torch.device:
        if getattr(args, 'cpu', False):
            return torch.device('cpu')
        if not torch.cuda.is_available():
            log('CUDA is not available: running on the CPU')
            return torch.device('cpu')
        if _distributed():
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))  # one GPU per torchrun process
        return torch.device('cuda')

    def _log_network(self, net: nn.Module, scale: int | None) -> None:
        n_params = sum(p.numel() for p in net.parameters())
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        config = getattr(net, 'config', None)
        cfg = ' '.join(f'{k}={v}' for k, v in config.items()) if isinstance(config, dict) else ''
        at = f' x{scale}' if scale is not None else ''
        at += f' ({cfg})' if cfg else ''
        self.log(f'Model {type(net).__name__}{at}: {n_params:,} parameters '
                 f'({n_train:,} trainable), device {self.device}')

    def _scaled_path(self, path: str, index: int) -> str:
        """Checkpoint path of network `index`: '{scale}' replaced; with several networks and no
        placeholder, '_x<scale>' is inserted before the suffix."""
        scale = self.scales[index] if len(self.nets) > 1 else self.scales[0]
        if '{scale}' in path:
            return path.replace('{scale}', str(scale))
        if len(self.nets) == 1:
            return path
        p = Path(path)
        return str(p.with_name(f'{p.stem}_x{scale}{p.suffix}'))

    def _load_pre_train(self, pre_train: str) -> None:
        if pre_train in ('', '.'):
            return
        if len(self.nets) > 1 and '{scale}' not in pre_train:
            raise UserError(f'--pre_train {pre_train}: one checkpoint cannot serve --scale '
                            f'{"+".join(map(str, self.scales))}; put {{scale}} in the path (e.g. HSPAN_x{{scale}}.pt)')
        for i, net in enumerate(self.nets):
            path = self._scaled_path(pre_train, i)
            self.log(f'Loading model from {path}')
            load_into(net, path)

    # ---- access

    def _index(self) -> int:
        return 0 if len(self.nets) == 1 else self.idx_scale

    @property
    def model(self) -> nn.Module:
        """The plain (unwrapped) network of the current scale."""
        return self.nets[self._index()]

    def get_model(self) -> nn.Module:
        return self.model

    # ---- checkpoints

    def checkpoint_path(self, folder: str | Path, stem: str) -> Path:
        """folder/model/<stem>.pt (or .safetensors when only that exists) of the first network."""
        base = Path(folder) / 'model'
        for suffix in CHECKPOINT_SUFFIXES:
            if Path(self._scaled_path(str(base / f'{stem}{suffix}'), 0)).is_file():
                return base / f'{stem}{suffix}'
        return base / f'{stem}{CHECKPOINT_SUFFIXES[0]}'

    def load_state(self, path: str | Path, flag: str = 'checkpoint') -> None:
        """Strictly load a checkpoint written by save() (per-scale files when there are several networks)."""
        for i in range(len(self.nets)):
            file = Path(self._scaled_path(str(path), i))
            if not file.is_file():
                have = sorted(p.name for p in file.parent.glob('model_*')) if file.parent.is_dir() else []
                raise UserError(f'{flag}: {file} does not exist (have: {", ".join(have) or "none"}; '
                                'per-epoch files need --save_models)')
        for i, net in enumerate(self.nets):
            load_into(net, self._scaled_path(str(path), i), flag=flag)

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strictly load this wrapper's own state dict (as in a training state); UserError naming the keys."""
        check_state_fits(self, state, source)
        self.load_state_dict(state, strict=True)

    def save(self, apath: str | Path, epoch: int, is_best: bool = False) -> None:
        """Write apath/model/model_latest.pt (+ model_best.pt, model_<epoch>.pt with --save_models):
        plain state dicts, atomically. Several networks: model_latest_x<scale>.pt and so on."""
        names = ['model_latest.pt']
        if is_best:
            names.append('model_best.pt')
        if self.save_models:
            names.append(f'model_{epoch}.pt')
        folder = Path(apath) / 'model'
        for i, net in enumerate(self.nets):
            state = plain_state_dict(net)
            for name in names:
                atomic_torch_save(state, self._scaled_path(str(folder / name), i))

    # ---- forwards

    def forward(self, lr: torch.Tensor, idx_scale: int | torch.Tensor = 0) -> torch.Tensor:
        """Training mode: the plain network. Eval mode: --tile or --chop, inside --self_ensemble, at --precision."""
        if isinstance(idx_scale, torch.Tensor):  # one value per batch
            idx_scale = int(idx_scale.reshape(-1)[0])
        self.idx_scale = int(idx_scale)
        net = self.model
        if hasattr(net, 'set_scale'):
            net.set_scale(self.idx_scale)
        if self.training:
            return self._train_runners[self._index()](lr)
        if self.self_ensemble:
            return self.forward_x8(lr, self._forward_one)
        return self._forward_one(lr)

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile:
            return self.forward_tiled(x)
        if self.chop:
            return self.forward_chop(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One network call at the evaluation precision; float32 out."""
        runner = self._runners[self._index()]
        if self.half_weights:
            return runner(x.half()).float()
        if self.autocast_half:
            with torch.autocast('cuda', dtype=torch.float16):
                return runner(x).float()
        return runner(x)

    def _chop_rule(self) -> dict[str, int]:
        rule = dict(HSPAN_CHOP)
        own = getattr(self.model, 'chop_rule', None)  # e.g. MSNLAN's published variant
        if callable(own):
            rule.update(own(self.scales[self.idx_scale]))
        return rule

    def forward_chop(self, x: torch.Tensor, shave: int | None = None, min_size: int | None = None) -> torch.Tensor:
        """The published forward_chop: four overlapping quarters, recursively until a quarter is smaller
        than min_size pixels; each output quarter is cut from the matching SR quarter."""
        rule = self._chop_rule()
        return self._chop(x, self.scales[self.idx_scale],
                          rule['shave'] if shave is None else shave,
                          rule['min_size'] if min_size is None else min_size,
                          rule['h_mult'], rule['w_mult'])

    def _chop(self, x: torch.Tensor, scale: int, shave: int, min_size: int, h_mult: int, w_mult: int) -> torch.Tensor:
        b, _, h, w = x.shape
        h_half, w_half = h // 2, w // 2
        h_size, w_size = h_half + shave, w_half + shave
        h_size += h_mult - h_size % h_mult
        w_size += w_mult - w_size % w_mult
        if h_size > h or w_size > w or (h_size == h and w_size == w and h_size * w_size >= min_size):
            # Too small to split, or splitting would not shrink it: the published code fails on such inputs
            # (bad slices, endless recursion); a plain forward is what it means.
            return self._run(x)
        lr_list = [
            x[:, :, 0:h_size, 0:w_size],
            x[:, :, 0:h_size, (w - w_size):w],
            x[:, :, (h - h_size):h, 0:w_size],
            x[:, :, (h - h_size):h, (w - w_size):w],
        ]
        if w_size * h_size < min_size:
            n = min(self.n_parallel, 4)  # quarters per call, one per GPU as published
            sr_list: list[torch.Tensor] = []
            for i in range(0, 4, n):
                sr_list.extend(self._run(torch.cat(lr_list[i:i + n], dim=0)).chunk(n, dim=0))
        else:
            sr_list = [self._chop(p, scale, shave, min_size, h_mult, w_mult) for p in lr_list]

        h, w = scale * h, scale * w
        h_half, w_half = scale * h_half, scale * w_half
        h_size, w_size = scale * h_size, scale * w_size
        out = sr_list[0].new_empty(b, sr_list[0].shape[1], h, w)
        out[:, :, 0:h_half, 0:w_half] = sr_list[0][:, :, 0:h_half, 0:w_half]
        out[:, :, 0:h_half, w_half:w] = sr_list[1][:, :, 0:h_half, (w_size - w + w_half):w_size]
        out[:, :, h_half:h, 0:w_half] = sr_list[2][:, :, (h_size - h + h_half):h_size, 0:w_half]
        out[:, :, h_half:h, w_half:w] = sr_list[3][:, :, (h_size - h + h_half):h_size, (w_size - w + w_half):w_size]
        return out

    def forward_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image inference on --tile x --tile LR tiles overlapping by at least --tile_overlap, one
        tile at a time, blended with tile_weights (memory: the output plus one tile)."""
        scale = self.scales[self.idx_scale]
        b, _, h, w = x.shape
        t, k = self.tile, self.tile_overlap
        ys, xs = tile_starts(h, t, k), tile_starts(w, t, k)
        wy, wx = tile_weights(ys, h, t, k, scale), tile_weights(xs, w, t, k, scale)
        th, tw = min(t, h), min(t, w)
        out: torch.Tensor | None = None
        norm: torch.Tensor | None = None
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                sr = self._run(x[:, :, y0:y0 + th, x0:x0 + tw])
                if out is None or norm is None:
                    out = sr.new_zeros(b, sr.shape[1], scale * h, scale * w)
                    norm = sr.new_zeros(1, 1, scale * h, scale * w)
                weight = (wy[i][:, None] * wx[j][None, :]).to(sr)
                region = (slice(None), slice(None),
                          slice(scale * y0, scale * (y0 + th)), slice(scale * x0, scale * (x0 + tw)))
                out[region] += sr * weight
                norm[region] += weight
        assert out is not None and norm is not None
        return out / norm.clamp_min(1e-12)

    @staticmethod
    def forward_x8(x: torch.Tensor, forward: Forward) -> torch.Tensor:
        """Self-ensemble: the mean of forward over the 8 flips/transpositions, each mapped back.

        Order as published: bit 0 flips width, bit 1 flips height, bit 2 transposes (applied in that order).
        """
        outs = []
        for t in range(8):
            y = x
            if t & 1:
                y = y.flip(-1)
            if t & 2:
                y = y.flip(-2)
            if t & 4:
                y = y.transpose(-1, -2)
            sr = forward(y)
            if t & 4:
                sr = sr.transpose(-1, -2)
            if t & 2:
                sr = sr.flip(-2)
            if t & 1:
                sr = sr.flip(-1)
            outs.append(sr)
        return torch.stack(outs, dim=0).mean(dim=0)

    def extra_repr(self) -> str:
        return f'name={self.name}, scales={self.scales}, device={self.device}'


__all__ = ['ALIASES', 'HSPAN_CHOP', 'WRAPPER_KEYS', 'Model', 'check_state_fits', 'load_into', 'make_network',
           'plain_state_dict', 'read_state_dict', 'registered_models', 'resolve_model_name', 'tile_starts',
           'tile_weights', 'unwrap_state_dict']
