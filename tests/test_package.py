"""The package as another project gets it: `pip install --no-deps .` (not editable) into a fresh venv, then used
from an unrelated folder: `import nlsr`, nlsr.hspa against a sort-based sparsemax in float64 (outputs and
gradients), nlsr.HSPA training on the native kernels built from the installed sources, and every console script
answering --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from test_readme_commands import console_scripts

# What the installed package is built from (a copy, so that the build leaves nothing in the checkout).
PROJECT_FILES = ('pyproject.toml', 'README.md', 'LICENSE', 'src')

USE = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    import nlsr
    from nlsr.model.hspa import native

    site = Path(sys.argv[1]).resolve()
    assert Path(nlsr.__file__).resolve().is_relative_to(site), nlsr.__file__
    assert native.load() is not None, native.unavailable_reason()
    assert str(native.loader.SOURCE.resolve()).startswith(str(site)), native.loader.SOURCE


    def sparsemax(z):  # the sort-based formula (Martins & Astudillo 2016), an independent oracle
        s, _ = torch.sort(z, dim=-1, descending=True)
        k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
        support = (1 + k * s > s.cumsum(-1)).sum(-1, keepdim=True)
        tau = (s.cumsum(-1).gather(-1, support - 1) - 1) / support.to(z.dtype)
        return torch.clamp(z - tau, min=0)


    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 150, c, dtype=torch.float64, generator=gen, requires_grad=True) for c in (8, 8, 5))
    w = torch.randn(2, 150, 5, dtype=torch.float64, generator=gen)
    got = nlsr.hspa(q, k, v)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    want = sparsemax(q @ k.transpose(1, 2)) @ v
    oracle = torch.autograd.grad((want * w).sum(), (q, k, v))
    assert (got - want).abs().max() < 1e-10, (got - want).abs().max()
    for a, b in zip(grads, oracle):
        assert (a - b).abs().max() < 1e-9, (a - b).abs().max()

    torch.manual_seed(0)
    layer = nlsr.HSPA(16, reduction=2, res_scale=1, topk=8)
    x, target = torch.randn(2, 16, 12, 12), torch.randn(2, 16, 12, 12)
    plan = layer.plan(x.requires_grad_())
    assert plan.path == 'blocked' and plan.backend == 'native', plan
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    print('ok', plan.describe())
''')


@pytest.mark.slow
def test_installed_package_works_from_an_unrelated_folder(tmp_path: Path) -> None:
    project = tmp_path / 'project'
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
        else:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    venv = tmp_path / 'venv'
    # --system-site-packages: torch and the other dependencies are this interpreter's (nothing is downloaded);
    # without pip of its own the venv runs this interpreter's pip and setuptools (--no-build-isolation: offline).
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
    env['XDG_CACHE_HOME'] = str(tmp_path / 'cache')  # the native kernels are built from the installed sources
    env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
    install = subprocess.run([str(python), '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '-q', '.'],
                             cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'use.py').write_text(USE)
    used = subprocess.run([str(python), 'use.py', site], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=900)
    assert used.returncode == 0 and used.stdout.startswith('ok'), used.stderr[-3000:]
    scripts = console_scripts()
    assert {'nlsr', 'nlsr-upscale', 'nlsr-export', 'nlsr-table'} <= scripts.keys()
    for name in scripts:
        out = subprocess.run([str(venv / 'bin' / name), '--help'], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.startswith(f'usage: {name}'), f'{name}: {out.stderr[-500:]}'
