"""Loss strings, weighted sums, the per-epoch log and its save/load for resume."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import loss
from errors import UserError
from training.schedule import set_lr


def _args(spec: str, **kw: object) -> argparse.Namespace:
    base = dict(loss=spec, rgb_range=1, n_colors=3, gan_k=1, lr=1e-4, betas=(0.9, 0.999), epsilon=1e-8,
                weight_decay=0, decay_milestones=[2], gamma=0.5, patch_size=16)
    base.update(kw)
    return argparse.Namespace(**base)


def test_parse_weights_and_names() -> None:
    assert loss.parse_loss('1*L1+0.1*MSE') == [loss.Term(1.0, 'L1'), loss.Term(0.1, 'MSE')]
    assert loss.parse_loss('L1') == [loss.Term(1.0, 'L1')]
    assert loss.parse_loss(' 2e-1 * mse ') == [loss.Term(0.2, 'MSE')]
    assert loss.parse_loss('0.006*VGG54+1e-3*GAN') == [loss.Term(0.006, 'VGG54'), loss.Term(0.001, 'GAN')]


@pytest.mark.parametrize('spec', ['', '1*L3', '1*L1+', '*L1', 'a*L1', '1*L1+2*L1', '0*L1', '1*L1*2', '-1*L1'])
def test_bad_strings_name_the_flag(spec: str) -> None:
    with pytest.raises(UserError, match='--loss'):
        loss.parse_loss(spec)


def test_weighted_sum_and_epoch_log() -> None:
    crit = loss.Loss(_args('1*L1+0.1*MSE'))
    assert crit.columns == ['L1', 'MSE', 'Total']
    g = torch.Generator().manual_seed(0)
    sr, hr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    crit.start_log()
    total = crit(sr, hr)
    expected = F.l1_loss(sr, hr) + 0.1 * F.mse_loss(sr, hr)
    assert torch.allclose(total, expected)
    crit.record()
    crit(sr * 0, hr)  # computed but not recorded: a skipped batch must not enter the mean
    crit(sr, hr)
    crit.record()
    crit.end_log()
    assert crit.log.shape == (1, 3)
    assert crit.log[0, 0].item() == pytest.approx(F.l1_loss(sr, hr).item())
    assert crit.log[0, 1].item() == pytest.approx(0.1 * F.mse_loss(sr, hr).item())
    assert crit.epoch_mean() == pytest.approx(expected.item())
    assert '[L1: ' in crit.display() and '[Total: ' in crit.display()


def test_single_term_has_no_total_column() -> None:
    crit = loss.Loss(_args('1*L1'))
    assert crit.columns == ['L1']
    crit.start_log()
    crit(torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    crit.record()
    crit.end_log()
    assert crit.epoch_mean() == pytest.approx(1.0)


def test_state_round_trip_truncates_to_resumed_epoch() -> None:
    a = loss.Loss(_args('1*L1+0.1*MSE'))
    for v in (1.0, 0.5, 0.25):
        a.start_log()
        a(torch.full((1, 3, 4, 4), v), torch.zeros(1, 3, 4, 4))
        a.record()
        a.end_log()
    b = loss.Loss(_args('1*L1+0.1*MSE'))
    b.load(a.state(), epochs=2)
    assert torch.equal(b.log, a.log[:2])
    with pytest.raises(UserError, match='--loss'):
        loss.Loss(_args('1*L1')).load(a.state(), epochs=2)


def test_loss_files(tmp_path) -> None:
    from runs import experiment

    ckp = experiment.Experiment(argparse.Namespace(save='lossrun', load='', reset=False, resume=0, test_only=False),
                             root=tmp_path)
    crit = loss.Loss(_args('1*L1+0.1*MSE'))
    for _ in range(2):
        crit.start_log()
        crit(torch.rand(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
        crit.record()
        crit.end_log()
    crit.save(ckp)
    ckp.done()
    assert torch.equal(torch.load(tmp_path / 'lossrun' / 'loss_log.pt'), crit.log)
    for c in ('L1', 'MSE', 'Total'):
        assert (tmp_path / 'lossrun' / f'loss_{c}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.skipif(importlib.util.find_spec('torchvision') is not None, reason='torchvision is installed')
def test_vgg_without_torchvision_is_a_clear_error() -> None:
    with pytest.raises(UserError, match='torchvision'):
        loss.Loss(_args('1*L1+0.01*VGG54'))


def test_gan_term_trains_discriminator_and_resumes() -> None:
    torch.manual_seed(0)
    crit = loss.Loss(_args('1*L1+0.01*GAN'))
    assert crit.columns == ['L1', 'GAN', 'DIS', 'Total']
    sr = torch.rand(2, 3, 16, 16, requires_grad=True)
    hr = torch.rand(2, 3, 16, 16)
    crit.start_log()
    before = [p.detach().clone() for p in crit.functions[1].dis.parameters()]
    total = crit(sr, hr)
    total.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    after = list(crit.functions[1].dis.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # D stepped
    crit.record()
    crit.end_log()
    adv = crit.functions[1]
    assert crit.optimizers() == [adv.optimizer]  # the trainer sets its LR from the one schedule
    set_lr(crit.optimizers(), 3e-5)
    twin = loss.Loss(_args('1*L1+0.01*GAN'))
    twin.load(crit.state(), epochs=1)
    adv2 = twin.functions[1]
    assert [g['lr'] for g in adv2.optimizer.param_groups] == [3e-5]
    assert adv2.optimizer.state_dict()['state'].keys() == adv.optimizer.state_dict()['state'].keys()
    for p, q in zip(adv.dis.parameters(), adv2.dis.parameters(), strict=True):
        assert torch.equal(p, q)
