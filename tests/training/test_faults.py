"""Faults at the decisive points: a worker SIGKILLed under torchrun --max-restarts, a second run on a live
experiment folder, a kill between the model files and the training state, a peer that stops answering,
write errors (ENOSPC, EIO, a read-only folder) during a checkpoint, and a diverging run (--max_skips).

Runs are driven through tests/training/faults_harness.py (subprocesses of a tiny HSPAN, 3 epochs of 3
batches), or in-process through main.main where no process has to die; benchmarks/faults.py kills at random
moments.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import faults_harness as faults
from conftest import ROOT
from nlsr import fileio, main


@pytest.fixture(scope='module')
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return faults.make_world(tmp_path_factory.mktemp('faults'))


@pytest.fixture(scope='module')
def reference(world: dict) -> Path:
    """The uninterrupted single-process run."""
    return faults.reference_run(world, ddp=False)[0]


def _main(world: dict, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """main.main in this process (no kill needed); its exit status."""
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(world['exp']))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1), so the numbers match bit for bit
    try:
        return main.main([*faults.TINY, '--dir_data', str(world['data']), '--dir_cache', str(world['cache']),
                          *argv])
    finally:
        torch.set_num_threads(threads)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _wait_for(predicate: object, proc: subprocess.Popen, what: str, limit: float = 120) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f'the run ended before {what}:\n{proc.communicate()[0][-3000:]}'
        assert time.time() - t0 < limit, f'no {what} after {limit} s'
        time.sleep(0.05)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_finishes(world: dict) -> None:
    """--max-restarts 2: one worker SIGKILLed in epoch 2 of 3; the job completes by itself, epoch 3 is
    evaluated and the weights are the uninterrupted run's (within 1e-6)."""
    ref, _ = faults.reference_run(world, ddp=True)
    name = 'elastic'
    log = world['exp'] / name / 'log.txt'
    proc = subprocess.Popen(faults.command(world, ['--save', name, '--epochs', '3'], ddp=True), cwd=ROOT,
                            env=faults.environment(world), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: log.exists() and '[Epoch 2]' in log.read_text(), proc, 'epoch 2')
    workers = faults.children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    folder = world['exp'] / name
    text = log.read_text()
    assert 'restart 1: resuming from epoch 1' in text
    assert faults.check(folder, ref, ddp=True) == []
    assert torch.load(folder / 'training_state.pt', weights_only=True)['epoch'] == 3
    assert not (world['exp'] / f'.{name}.lock').exists()


@pytest.mark.slow
def test_second_run_on_a_live_folder_is_refused(world: dict, reference: Path) -> None:
    """A run paused inside its epoch-2 training-state write (after its model files) holds the folder: a
    second run, --reset included, is refused in one line naming it and changes nothing. After a SIGKILL at
    that moment, --load --resume -1 continues to the uninterrupted run's weights, bit for bit."""
    name = 'live'
    rc, out, _, _ = faults.run(world, ['--save', name, '--epochs', '1'], ddp=False)
    assert rc == 0, out
    folder = world['exp'] / name
    proc = subprocess.Popen(faults.command(world, ['--load', name, '--resume', '-1', '--epochs', '3'], ddp=False),
                            cwd=ROOT, env=faults.environment(world, 'training_state.pt:written:pause'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list(folder.glob('.training_state.pt.*.tmp')), proc, 'the paused state write')
        before = {}
        while before != _snapshot(folder):  # the temporary file is complete when the writer pauses
            before = _snapshot(folder)
            time.sleep(0.5)
        for argv in (['--save', name, '--reset'], ['--load', name, '--resume', '-1']):
            rc, out, _, _ = faults.run(world, [*argv, '--epochs', '3'], ddp=False)
            lines = out.strip().splitlines()
            assert rc == 1 and len(lines) == 1, out
            assert lines[0].startswith('error: --save/--load live:') and f'pid {proc.pid}' in lines[0], lines[0]
            assert _snapshot(folder) == before
    finally:
        proc.kill()
        proc.communicate()
    assert torch.load(folder / 'training_state.pt', weights_only=True)['epoch'] == 1  # the state not yet renamed
    rc, out, _, _ = faults.run(world, ['--load', name, '--resume', '-1', '--epochs', '3'], ddp=False)
    assert rc == 0, out
    assert faults.check(folder, reference, ddp=False) == []


@pytest.mark.slow
def test_killed_before_first_state_is_not_resumed_from_its_model_files(world: dict) -> None:
    name = 'early'
    rc, out, _, _ = faults.run(world, ['--save', name, '--epochs', '3'], ddp=False, fault='training_state.pt:open:kill')
    assert rc == -signal.SIGKILL and (world['exp'] / name / 'model' / 'model_latest.pt').exists()
    rc, out, _, _ = faults.run(world, ['--load', name, '--resume', '-1', '--epochs', '3'], ddp=False)
    assert rc == 1 and 'stopped before its first complete checkpoint' in out and '--reset' in out, out


@pytest.mark.slow
def test_peer_that_stops_answering_ends_the_job_in_bounded_time(world: dict) -> None:
    """Rank 0 hangs inside a checkpoint write: rank 1 gives up after --dist_timeout with one line, and
    torchrun ends the job (no --max-restarts here)."""
    argv = ['--save', 'stuck', '--epochs', '2', '--dist_timeout', '10']
    cmd = faults.command(world, argv, ddp=True)
    env = faults.environment(world, 'training_state.pt:written:pause')
    t0 = time.time()
    proc = subprocess.run([*faults.TORCHRUN[:-2], *cmd[len(faults.TORCHRUN):]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert 'error: rank 1: a torchrun peer failed or timed out' in proc.stdout + proc.stderr


@pytest.mark.parametrize('fault', ['model_latest.pt:written:enospc', 'training_state.pt:written:eio'])
@pytest.mark.slow
def test_write_error_stops_with_one_line_and_keeps_the_checkpoint(fault: str, world: dict, reference: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    name = 'full_disk_' + fault.split('.')[0]
    assert _main(world, monkeypatch, '--save', name, '--epochs', '1') == 0
    folder = world['exp'] / name
    before = {f: (folder / f).read_bytes() for f in ('training_state.pt', 'model/model_latest.pt')}
    capsys.readouterr()
    monkeypatch.setenv('SR_FAULT', fault)
    assert _main(world, monkeypatch, '--load', name, '--resume', '-1', '--epochs', '3') == 1
    err = capsys.readouterr().err.strip().splitlines()
    file, _, kind = fault.split(':')
    message = os.strerror(errno.ENOSPC if kind == 'enospc' else errno.EIO)
    assert len(err) == 1 and err[0].startswith('error: ') and err[0].endswith(f'{file}: cannot write ({message})')
    assert (folder / 'training_state.pt').read_bytes() == before['training_state.pt']
    if file == 'training_state.pt':  # the model files of epoch 2 were written: the state still says epoch 1
        assert (folder / 'model' / 'model_latest.pt').read_bytes() != before['model/model_latest.pt']
    else:
        assert (folder / 'model' / 'model_latest.pt').read_bytes() == before['model/model_latest.pt']
    assert not list(folder.rglob('*.tmp'))
    monkeypatch.delenv('SR_FAULT')
    assert _main(world, monkeypatch, '--load', name, '--resume', '-1', '--epochs', '3') == 0
    assert faults.check(folder, reference, ddp=False) == []


def test_patched_write_enospc_and_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / 'state.pt'
    fileio.atomic_write_bytes(target, b'old')

    def no_space(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, 'save', no_space)
    with pytest.raises(fileio.WriteError, match=r'state\.pt: cannot write \(No space left on device\)'):
        fileio.atomic_torch_save({'a': 1}, target)
    monkeypatch.undo()

    def read_only(*_: object, **__: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fileio.tempfile, 'mkstemp', read_only)
    with pytest.raises(fileio.WriteError, match='Read-only file system'):
        fileio.atomic_write_text(target, 'new')
    assert target.read_bytes() == b'old' and sorted(p.name for p in tmp_path.iterdir()) == ['state.pt']


def test_diverging_run_stops_after_max_skips(world: dict, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """--lr 1e30 from epoch 2 on: the weights explode, every later loss is skipped, and after --max_skips
    the run stops in one line; the epoch-1 checkpoint is untouched and nothing non-finite was written."""
    name = 'diverge'
    assert _main(world, monkeypatch, '--save', name, '--epochs', '1') == 0
    folder = world['exp'] / name
    before = _snapshot(folder / 'model')
    state = (folder / 'training_state.pt').read_bytes()
    capsys.readouterr()
    assert _main(world, monkeypatch, '--load', name, '--resume', '-1', '--epochs', '3', '--lr', '1e30',
                 '--max_skips', '2') == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --max_skips 2: 2 consecutive batches skipped'), err
    assert 'checkpoint of epoch 1 is intact' in err[0]
    assert _snapshot(folder / 'model') == before and (folder / 'training_state.pt').read_bytes() == state
    assert (folder / 'log.txt').read_text().count('Skip batch') == 2


def test_non_finite_weights_are_never_written() -> None:
    from nlsr.distributed import RankZeroError
    from nlsr.training import trainer

    net = torch.nn.Linear(2, 2)
    trainer.check_finite(net, 3)
    with torch.no_grad():
        net.weight[0, 0] = float('nan')
    with pytest.raises(RankZeroError, match='epoch 3: the weights are not finite'):
        trainer.check_finite(net, 3)


def test_restarted_group_continues_only_a_run_of_the_same_configuration(
        world: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    name = 'restarted'
    assert _main(world, monkeypatch, '--save', name, '--epochs', '1') == 0
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    capsys.readouterr()
    assert _main(world, monkeypatch, '--save', name, '--epochs', '2', '--lr', '2e-3') == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds a run of another configuration (differs in --epochs, --lr)' in err[0], err
    assert _main(world, monkeypatch, '--save', name, '--epochs', '1') == 0  # same configuration: done already
    log = (world['exp'] / name / 'log.txt').read_text()
    assert log.count('restart 1: resuming from epoch 1') == 1 and log.count('[Epoch 1]') == 1


def test_fault_spec_names_file_and_step(tmp_path: Path) -> None:
    fileio.inject_fault(tmp_path / 'a.pt', 'written', 'b.pt:written:eio')  # another file: nothing
    fileio.inject_fault(tmp_path / 'a.pt', 'open', 'a.pt:written:eio')  # another step: nothing
    with pytest.raises(OSError, match='Input/output error'):
        fileio.inject_fault(tmp_path / 'a.pt', 'written', 'a.pt:written:eio')
