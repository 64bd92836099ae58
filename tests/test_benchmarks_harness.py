"""benchmarks/harness.py: the machine line names the CPU and its vector extensions; the peak RSS of a worker
process reads at least what it allocated, and only what it allocated inside the measured block."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import harness  # noqa: E402

CPUINFO = Path('/proc/cpuinfo')
MIB = 160
# The kernel keeps RSS in per-CPU counters (anon, file, shmem) and /proc reads them without summing the
# per-CPU parts: each may lag by max(32, 2 x CPUs) pages per CPU; extra_mib is the difference of two reads.
_CPUS = os.cpu_count() or 1
COUNTER_SLACK_MIB = 2 * 3 * _CPUS * max(32, 2 * _CPUS) * os.sysconf('SC_PAGE_SIZE') / 2**20

# A worker as the benchmark scripts write one: ``--worker JSON``, the result as the last stdout line. It
# allocates ``before`` MiB and frees it before the measured block, then ``inside`` MiB inside it (and frees
# that too, so only the high-water mark can see it). bytes * n writes every page, so the pages are resident.
WORKER = '''
import json, sys
sys.path.insert(0, {benchmarks!r})
from harness import PeakMemory

spec = json.loads(sys.argv[sys.argv.index('--worker') + 1])
block = b'\\x01' * (spec['before'] << 20)
del block
with PeakMemory() as peak:
    block = b'\\x01' * (spec['inside'] << 20)
    del block
print('not the result')
print(json.dumps({{'extra_mib': peak.extra_mib, 'peak_mib': peak.peak_mib, 'method': peak.method}}))
'''


@pytest.mark.skipif(not CPUINFO.is_file(), reason='needs /proc/cpuinfo')
def test_machine_line_names_the_cpu_model_and_its_vector_extensions():
    text = CPUINFO.read_text()
    model = next(line.split(':', 1)[1].strip() for line in text.splitlines()
                 if line.split(':')[0].strip() in ('model name', 'Model'))
    flags = set(next(line.split(':', 1)[1].split() for line in text.splitlines()
                     if line.split(':')[0].strip() in ('flags', 'Features')))
    line = harness.machine_line('2 torch threads')
    assert line.startswith(model + ' (')
    vector = line[len(model) + 2:line.index(')', len(model))].split()
    expected = [f for f in ('sse4_2', 'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'asimd', 'sve') if f in flags]
    assert expected, 'this CPU reports none of the common vector extensions'
    assert set(expected) <= set(vector) and set(vector) <= flags
    import torch

    assert f'torch {torch.__version__}' in line and '2 torch threads' in line and 'cores' in line


def test_cpuinfo_parsing_keeps_the_vector_extensions_only():
    text = ('processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n'
            'flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 ht\n'
            'processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n')
    model, vector = harness.parse_cpuinfo(text)
    assert model == 'Intel(R) Xeon(R) Platinum 8480+'
    assert vector == ['sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_int8', 'amx_bf16']
    arm = 'Model\t: Raspberry Pi 5\nFeatures\t: fp asimd crc32\n'
    assert harness.parse_cpuinfo(arm) == ('Raspberry Pi 5', ['asimd'])


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / 'alloc_worker.py'
    path.write_text(WORKER.format(benchmarks=str(ROOT / 'benchmarks')))
    return path


@pytest.mark.skipif(not Path('/proc/self/status').is_file(), reason='needs /proc/self/status')
def test_peak_rss_of_a_subprocess_reads_what_it_allocated(worker: Path):
    result = harness.run_case(worker, {'before': 0, 'inside': MIB})
    assert result['method'] == 'VmHWM'
    assert result['extra_mib'] >= MIB - COUNTER_SLACK_MIB and result['peak_mib'] >= MIB
    assert result['extra_mib'] < MIB + 64   # the bytes object and little else


@pytest.mark.skipif(not Path('/proc/self/status').is_file(), reason='needs /proc/self/status')
def test_peak_rss_forgets_what_was_freed_before_the_block(worker: Path):
    result = harness.run_case(worker, {'before': 2 * MIB, 'inside': 8})
    assert result['method'] == 'VmHWM'   # the reset worked: the earlier 2 x MIB are not counted
    assert 8 - COUNTER_SLACK_MIB <= result['extra_mib'] < MIB


def test_a_failing_case_reports_its_last_error_line(tmp_path: Path):
    script = tmp_path / 'failing.py'
    script.write_text("import sys\nprint('partial')\nsys.exit('--size 0: expected a positive size')\n")
    assert harness.run_case(script, {}) == {'error': '--size 0: expected a positive size'}
