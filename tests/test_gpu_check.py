"""benchmarks/gpu_check.py without a GPU (run as a command: tests never import benchmarks/): its self-test
passes (the command line parses, every check is registered with a unique name, a description and an
estimate), it lists every check and exits with status 2 saying in one line that no GPU check ran."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / 'benchmarks' / 'gpu_check.py'
CHECKS = ('environment', 'operator', 'operator triton L=196608', 'block', 'training step across impls', 'AMP steps',
          'GPU vs CPU kernels', 'autocast in DataParallel threads', 'DDP 2 processes', 'wrapper modes',
          'memory rule near its limit', 'main.py train, resume, safetensors, test_only', '--compile',
          'static Triton resources')


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU path')
def test_without_a_gpu_it_self_tests_lists_its_checks_and_exits_2():
    done = _run()
    assert done.returncode == 2, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == 'No CUDA GPU on this machine: no GPU check ran (nothing was measured on a GPU).'
    assert lines[-2] == f'self-test passed: {len(CHECKS)} checks registered and named; the command line parses'
    assert [line.split('  ~')[0].strip() for line in lines[:-2]] == list(CHECKS)


def test_list_and_a_bad_check_name():
    listed = _run('--list')
    assert listed.returncode == 0 and 'self-test passed' in listed.stdout
    bad = _run('--only', 'no such check')
    assert bad.returncode == 2 and "unknown checks ['no such check']" in bad.stderr
