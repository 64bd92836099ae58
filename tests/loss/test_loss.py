"""Loss strings, weighted sums, the purity of forward(), the GAN discriminator step, and the per-epoch loss log
(runs/loss_log.py) with its files and its save/load for resume."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from nlsr import loss
from nlsr.errors import UserError
from nlsr.runs.loss_log import LossLog
from nlsr.training.schedule import set_lr


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


def _step(crit: loss.Loss, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """What the training loop does with one batch: the discriminator step, the forward; total and values."""
    discriminator = crit.discriminator_step(sr, hr)
    result = crit(sr, hr)
    return result.total, crit.step_values(result, discriminator)


def test_weighted_sum_and_epoch_log() -> None:
    crit = loss.Loss(_args('1*L1+0.1*MSE'))
    assert crit.columns == ['L1', 'MSE', 'Total']
    log = LossLog(crit.columns)
    g = torch.Generator().manual_seed(0)
    sr, hr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    log.start_epoch()
    total, values = _step(crit, sr, hr)
    expected = F.l1_loss(sr, hr) + 0.1 * F.mse_loss(sr, hr)
    assert torch.allclose(total, expected)
    log.record(values)
    _step(crit, sr * 0, hr)  # computed but not recorded: a skipped batch must not enter the mean
    log.record(_step(crit, sr, hr)[1])
    log.end_epoch()
    assert log.rows.shape == (1, 3)
    assert log.rows[0, 0].item() == pytest.approx(F.l1_loss(sr, hr).item())
    assert log.rows[0, 1].item() == pytest.approx(0.1 * F.mse_loss(sr, hr).item())
    assert log.epoch_mean() == pytest.approx(expected.item())
    assert '[L1: ' in log.display() and '[Total: ' in log.display()
    result = crit(sr, hr)
    assert set(result.terms) == {'L1', 'MSE'}
    assert result.terms['MSE'].item() == pytest.approx(0.1 * F.mse_loss(sr, hr).item())


def test_single_term_has_no_total_column() -> None:
    crit = loss.Loss(_args('1*L1'))
    assert crit.columns == ['L1']
    log = LossLog(crit.columns)
    log.start_epoch()
    log.record(_step(crit, torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))[1])
    log.end_epoch()
    assert log.epoch_mean() == pytest.approx(1.0)


def test_state_round_trip_truncates_to_resumed_epoch() -> None:
    a = loss.Loss(_args('1*L1+0.1*MSE'))
    a_log = LossLog(a.columns)
    for v in (1.0, 0.5, 0.25):
        a_log.start_epoch()
        a_log.record(_step(a, torch.full((1, 3, 4, 4), v), torch.zeros(1, 3, 4, 4))[1])
        a_log.end_epoch()
    state = {**a.state(), **a_log.state()}  # the training state's 'loss' entry
    b = loss.Loss(_args('1*L1+0.1*MSE'))
    b.load(state)
    b_log = LossLog(b.columns)
    b_log.load(state, epochs=2)
    assert torch.equal(b_log.rows, a_log.rows[:2])
    with pytest.raises(UserError, match='--loss'):
        loss.Loss(_args('1*L1')).load(state)


def test_loss_files(tmp_path) -> None:
    from nlsr.runs import experiment

    ckp = experiment.Experiment(argparse.Namespace(save='lossrun', load='', reset=False, resume=0, test_only=False),
                             root=tmp_path)
    crit = loss.Loss(_args('1*L1+0.1*MSE'))
    log = LossLog(crit.columns)
    for _ in range(2):
        log.start_epoch()
        log.record(_step(crit, torch.rand(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))[1])
        log.end_epoch()
    log.save(ckp)
    ckp.done()
    assert torch.equal(torch.load(tmp_path / 'lossrun' / 'loss_log.pt'), log.rows)
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
    log = LossLog(crit.columns)
    log.start_epoch()
    before = [p.detach().clone() for p in crit.functions[1].dis.parameters()]
    total, values = _step(crit, sr, hr)
    total.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    after = list(crit.functions[1].dis.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # D stepped
    log.record(values)
    log.end_epoch()
    adv = crit.functions[1]
    assert crit.optimizers() == [adv.optimizer]  # the trainer sets its LR from the one schedule
    set_lr(crit.optimizers(), 3e-5)
    twin = loss.Loss(_args('1*L1+0.01*GAN'))
    twin.load(crit.state())
    adv2 = twin.functions[1]
    assert [g['lr'] for g in adv2.optimizer.param_groups] == [3e-5]
    assert adv2.optimizer.state_dict()['state'].keys() == adv.optimizer.state_dict()['state'].keys()
    for p, q in zip(adv.dis.parameters(), adv2.dis.parameters(), strict=True):
        assert torch.equal(p, q)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize('spec', ['1*L1+0.1*MSE+1*Charbonnier', '1*L1+0.01*GAN'])
def test_forward_has_no_side_effects(spec: str) -> None:
    """Twice on the same inputs: the same total and terms, the same weights, buffers (the discriminator's
    BatchNorm statistics) and optimizer state, and no discriminator gradient."""
    torch.manual_seed(0)
    crit = loss.Loss(_args(spec, charbonnier_eps=1e-3))
    crit.train()
    sr, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    state, optim = _snapshot(crit), [o.state_dict() for o in crit.optimizers()]
    first, second = crit(sr, hr), crit(sr, hr)
    assert torch.equal(first.total, second.total)
    assert first.terms.keys() == second.terms.keys() == {t.name for t in crit.terms}
    assert all(torch.equal(first.terms[k], second.terms[k]) for k in first.terms)
    after = _snapshot(crit)
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert [o.state_dict() for o in crit.optimizers()] == optim
    assert all(p.grad is None for p in crit.parameters())


def test_discriminator_steps_only_when_called() -> None:
    torch.manual_seed(0)
    crit = loss.Loss(_args('1*L1+0.01*GAN', gan_k=2))
    adv = crit.functions[1]
    sr, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    start = _snapshot(adv.dis)
    for _ in range(3):
        crit(sr, hr)  # the forward alone: the discriminator is not trained
    assert all(torch.equal(start[k], v) for k, v in _snapshot(adv.dis).items())
    assert loss.Loss(_args('1*L1')).discriminator_step(sr, hr) == {}
    dis = crit.discriminator_step(sr, hr)
    assert set(dis) == {'DIS'} and dis['DIS'] > 0
    stepped = _snapshot(adv.dis)
    assert any(not torch.equal(start[k], stepped[k]) for k in start)
    assert adv.optimizer.state_dict()['state'][0]['step'].item() == 2  # --gan_k 2: two optimizer steps
