"""torchrun (env://) set-up and thin wrappers over torch.distributed's collectives.

Every wrapper degrades to the identity in a single process, so the trainer has one code path. Rank 0 is the
only process that reads or writes the experiment folder; the others receive what it read (resume state,
folder checks) through broadcasts, so several machines need not share that folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nlsr.errors import UserError

# Variables torchrun (and torch.distributed.launch) sets for every worker; env:// reads MASTER_ADDR/PORT too.
TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
RESTART_VAR = 'TORCHELASTIC_RESTART_COUNT'  # torchrun --max-restarts: 0 for the first worker group, then 1, 2...


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return max(0, int(env.get(RESTART_VAR, '0') or 0))
    except ValueError:
        raise UserError(f'{RESTART_VAR}={env[RESTART_VAR]!r}: expected an integer') from None


def peer_failure(e: BaseException) -> str | None:
    """A one-line reason when `e` is a collective that failed because a peer died or timed out, else None."""
    dist = torch.distributed
    if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
            w in str(e) for w in ('Connection closed by peer', 'Timed out', 'timed out', 'Connection reset'))):
        text = ' '.join(str(e).split())
        return f'a torchrun peer failed or timed out ({text[:200]}); torchrun --max-restarts resumes the run'
    return None


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised torch.distributed group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


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
    """The device rule: CUDA unless --cpu or no CUDA device is visible."""
    return not args.cpu and torch.cuda.is_available()


def choose_device(args: argparse.Namespace, log: Callable[[str], Any] = print) -> torch.device:
    """The device of the network: the CPU with --cpu or without CUDA, cuda:LOCAL_RANK in a torchrun job of
    several processes (one GPU each), else the current CUDA device."""
    if args.cpu:
        return torch.device('cpu')
    if not uses_cuda(args):
        log('CUDA is not available: running on the CPU')
        return torch.device('cpu')
    if get_world_size() > 1:
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    return torch.device('cuda')


def data_parallel_gpus(args: argparse.Namespace, device: torch.device) -> int:
    """How many GPUs one process drives with DataParallel: --n_GPUs on CUDA, else 1."""
    if device.type != 'cuda' or args.n_GPUs <= 1:
        return 1
    if args.n_GPUs > torch.cuda.device_count():
        raise UserError(f'--n_GPUs {args.n_GPUs}: only {torch.cuda.device_count()} CUDA devices are visible')
    return args.n_GPUs


class _UnderAutocast:
    """Calls one replica under an autocast state captured in the caller's thread."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype, enabled: bool) -> None:
        self.module, self.device_type, self.dtype, self.enabled = module, device_type, dtype, enabled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.module(*args, **kwargs)


class DataParallel(torch.nn.DataParallel):
    """torch's DataParallel (--n_GPUs) whose replicas run under the caller's autocast dtype.

    torch's worker threads re-enter autocast with ``enabled`` only, and the autocast dtype is kept per
    thread, so under ``torch.autocast('cuda', dtype=torch.bfloat16)`` (--amp bf16, --precision bf16) the
    replicas would run in float16, the thread default, with no GradScaler. Each replica here enters the
    caller's autocast state again inside its thread."""

    def parallel_apply(self, replicas: Sequence[torch.nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        # Without an accelerator torch builds no src_device_obj (and never calls this but in tests).
        kind = self.src_device_obj.type if hasattr(self, 'src_device_obj') else 'cpu'
        dtype, enabled = torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)
        runners = [_UnderAutocast(r, kind, dtype, enabled) for r in replicas]
        return super().parallel_apply(runners, inputs, kwargs)


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` inside DistributedDataParallel in a torchrun job of several processes (its construction
    broadcasts rank 0's weights, so every process starts equal); `net` itself otherwise."""
    if get_world_size() == 1:
        return net
    ids = [device.index] if device.type == 'cuda' else None
    # A multi-scale network (MDSR) trains one scale's branches per batch: the others get no gradient that step.
    unused = bool(getattr(net, 'multi_scale', False))
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused)


def check_batch_split(batch_size: int, accumulate: int, world_size: int) -> None:
    """--batch_size must split into --accumulate micro-batches on each of `world_size` processes."""
    if batch_size % (accumulate * world_size):
        processes = f' x {world_size} torchrun processes' if world_size > 1 else ''
        raise UserError(f'--batch_size {batch_size} is not divisible by --accumulate {accumulate}{processes}: '
                        'each optimizer step needs equal micro-batches')


def check_distributed_args(args: argparse.Namespace, env: DistEnv) -> None:
    """Flag combinations a torchrun job cannot run, refused alike by every process before any collective."""
    n_gpus = args.n_GPUs
    if n_gpus > 1:
        raise RankZeroError(f'--n_GPUs {n_gpus} is DataParallel inside one process and cannot be combined with '
                            'torchrun: drop --n_GPUs and start one process per GPU (--nproc_per_node)')
    if args.batch_size % env.world_size:
        raise RankZeroError(f'--batch_size {args.batch_size} is the global batch: it must be divisible by the '
                            f'{env.world_size} torchrun processes (WORLD_SIZE)')
    try:
        check_batch_split(args.batch_size, args.accumulate, env.world_size)
    except UserError as e:
        raise RankZeroError(str(e)) from None
    if uses_cuda(args) and env.local_rank >= torch.cuda.device_count():
        raise RankZeroError(f'LOCAL_RANK {env.local_rank}: only {torch.cuda.device_count()} CUDA devices are '
                            'visible on this machine (lower --nproc_per_node, or use --cpu)')


def init_distributed(args: argparse.Namespace) -> DistEnv | None:
    """Join the torchrun job (env://): nccl on cuda:LOCAL_RANK, gloo with --cpu or without CUDA; every
    collective fails after --dist_timeout seconds without its peers (see peer_failure).

    None in a plain `python main.py` run. Checks the flags first, so a bad combination fails the same way
    on every process without waiting for a rendezvous.
    """
    env = torchrun_env()
    if env is None:
        return None
    check_distributed_args(args, env)
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=args.dist_timeout)  # the rendezvous and every collective
    # torchrun keeps one key-value store across restarts of the worker group: each group's keys get their
    # own prefix, so a restarted group never reads the addresses of the group that died.
    store, rank, world = next(dist.rendezvous('env://', timeout=timeout))
    store = dist.PrefixStore(f'restart{restart_count()}/', store)
    group = {'store': store, 'rank': rank, 'world_size': world, 'timeout': timeout}
    if uses_cuda(args):
        device = torch.device('cuda', env.local_rank)
        torch.cuda.set_device(device)  # object collectives and NCCL use the current device
        dist.init_process_group('nccl', device_id=device, **group)
    else:
        dist.init_process_group('gloo', **group)
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
