"""ONNX export (src/nlsr/tools/export.py, model/hspa/export.py): onnxruntime against PyTorch and the oracles.

The networks are tiny with random weights; each is exported at one size and run by onnxruntime (CPU) at
two others (one with odd height and width, one with batch 2), against the PyTorch forward (the project's
default HSPA). The exported HSPA is compared with entmax's float64 sparsemax on rows with ties, supports
wider than topk and all-equal rows, through several query blocks of the graph's loop.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip('onnx', reason='onnx is an optional dependency (requirements-export.txt)')
pytest.importorskip('onnxruntime', reason='onnxruntime is an optional dependency (requirements-export.txt)')
entmax = pytest.importorskip('entmax', reason='entmax (test-only dependency) is not installed')

from nlsr.model.checkpoint import write_checkpoint  # noqa: E402
from nlsr.model.hspa.export import hspa_attention_export, sparsemax_graph  # noqa: E402
from nlsr.model.networks.bicubic import Bicubic  # noqa: E402
from nlsr.model.networks.edsr import EDSR  # noqa: E402
from nlsr.model.networks.hspan import HSPAN  # noqa: E402
from nlsr.model.networks.msnlan import MSNLAN  # noqa: E402
from nlsr.tools.export import export_onnx, run_onnx  # noqa: E402

EXPORT_SIZE = 16
CHECK_SHAPES = ((1, 3, 19, 23), (2, 3, 20, 12))  # odd height and width; batch 2


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == 'hspan':
        net = HSPAN(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, reduction=2, topk=8, res_scale=1, rgb_range=1)
    elif name == 'msnlan':
        net = MSNLAN(scale=2, n_feats=16, n_resgroups=2, n_resblocks=1, res_scale=1, rgb_range=1)
    elif name == 'msnlan_hspa':
        net = MSNLAN(scale=3, n_feats=16, n_resgroups=2, n_resblocks=1, res_scale=1, rgb_range=1, attention='hspa')
    elif name == 'edsr':
        net = EDSR(scale=4, n_feats=16, n_resblocks=2, res_scale=1, rgb_range=1)
    else:
        net = EDSR(scale=2, n_feats=16, n_resblocks=2, res_scale=1, rgb_range=1, attention='hspa',
                   attention_every=1, topk=4)
    return net.eval()  # random weights: PyTorch's default initialisation


def _quantized(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x * 255, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize('name', ['hspan', 'msnlan', 'msnlan_hspa', 'edsr', 'edsr_hspa'])
def test_network_in_onnxruntime_matches_pytorch(name: str) -> None:
    net = _tiny(name)
    data = export_onnx(net, {'model': name, **net.config}, 3, 1, sample_size=EXPORT_SIZE)
    gen = torch.Generator().manual_seed(1)
    for shape in CHECK_SHAPES:
        lr = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            expected = net(lr).numpy()
        got = run_onnx(data, lr.numpy())
        assert got.shape == expected.shape == (shape[0], 3, shape[2] * net.config['scale'],
                                               shape[3] * net.config['scale'])
        assert float(np.abs(got - expected).max()) <= 1e-5, (name, shape)
        assert (_quantized(got) == _quantized(expected)).mean() >= 0.999, (name, shape)


def test_bicubic_graph_is_bit_exact() -> None:
    """The graph's Bicubic equals imresize (MATLAB's) on uint8 images, tiny ones included."""
    for scale in (2, 3, 4):
        net = Bicubic([scale], rgb_range=1).eval()
        data = export_onnx(net, {'model': 'bicubic', 'scale': scale}, 3, 1, sample_size=EXPORT_SIZE)
        for shape in ((1, 3, 17, 23), (2, 3, 2, 3)):
            lr = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(scale)).float() / 255
            assert np.array_equal(run_onnx(data, lr.numpy()), net(lr).numpy())


def _hard_rows(n_rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Score rows with exact ties (at the maximum too), supports wider than topk 128, all-equal rows."""
    quarter = n_rows // 4
    narrow = torch.randn(quarter, length, generator=gen, dtype=torch.float64) * 3
    wide = torch.randn(quarter, length, generator=gen, dtype=torch.float64) * 1e-3  # support ~ the whole row
    ties = torch.randint(0, 4, (quarter, length), generator=gen).double() * 0.25
    ties[:, :7] = 1.0  # tied maxima
    equal = torch.full((n_rows - 3 * quarter, length), 0.5, dtype=torch.float64)
    return torch.cat([narrow, wide, ties, equal])


class _Rows(nn.Module):
    def __init__(self, topk: int) -> None:
        super().__init__()
        self.topk = topk

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return sparsemax_graph(scores, self.topk)


class _Attention(nn.Module):
    def __init__(self, block_scores: int) -> None:
        super().__init__()
        self.block_scores = block_scores

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return hspa_attention_export(q, k, v, self.block_scores)


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], axes: dict) -> bytes:
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=17, input_names=names,
                          output_names=['out'], dynamic_axes=axes)
    return buffer.getvalue()


@pytest.mark.parametrize('topk', [128, 4])
def test_exported_sparsemax_rows_match_entmax(topk: int) -> None:
    """topk 128 (HSPA's): wide rows continue past the top k; topk 4: most rows do (ties of 7 maxima too)."""
    import onnxruntime

    gen = torch.Generator().manual_seed(0)
    data = _export(_Rows(topk), (torch.randn(4, 10),), ['scores'], {'scores': {0: 'rows', 1: 'length'}})
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    for length in (300, 37):
        rows = _hard_rows(64, length, gen)
        got = torch.from_numpy(session.run(None, {'scores': rows.float().numpy()})[0]).double()
        expected = entmax.sparsemax(rows.float().double(), dim=-1)
        assert float((got - expected).abs().max()) <= 2e-6
        supports = (expected > 0).sum(-1)
        assert torch.equal((got > 0).sum(-1)[:48], supports[:48])
        assert supports.max() > min(128, length - 1)  # supports wider than topk (or the whole row) occur
        assert torch.allclose(got[-16:], torch.full_like(got[-16:], 1 / length))  # all-equal rows: uniform


def test_exported_blocked_attention_matches_dense_oracle() -> None:
    """sparsemax(q k^T) v through the graph's query-block loop (blocks of 8 rows, a partial last block)
    equals the float64 dense oracle, on scores with ties, wide supports and all-equal rows."""
    import onnxruntime

    gen = torch.Generator().manual_seed(2)
    length, ck, c = 301, 4, 5
    block_scores = 8 * length + 3  # 8 query rows per block: 37 blocks and a last one of 5 rows
    data = _export(_Attention(block_scores), tuple(torch.randn(1, 20, w) for w in (ck, ck, c)), ['q', 'k', 'v'],
                   {n: {0: 'batch', 1: 'length'} for n in ('q', 'k', 'v')})
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    q = torch.randint(-2, 3, (2, length, ck), generator=gen).float()  # integer scores: exact ties
    q[0, :60] *= 1e-3  # wide supports (support > 128)
    q[1, :40] = 0  # all-equal rows
    k = torch.randint(-2, 3, (2, length, ck), generator=gen).float()
    v = torch.randn(2, length, c, generator=gen)
    got = torch.from_numpy(session.run(None, {'q': q.numpy(), 'k': k.numpy(), 'v': v.numpy()})[0]).double()
    weights = entmax.sparsemax(q.double() @ k.double().transpose(1, 2), dim=-1)
    assert (weights[0, :60] > 0).sum(-1).max() > 128
    assert float((got - weights @ v.double()).abs().max()) <= 1e-5


def test_export_command(tmp_path, capsys) -> None:
    """export.py writes the file with the configuration in its metadata and reports onnxruntime's check;
    a contradicting flag is one line, exit 1, and nothing is written."""
    from nlsr.tools import export

    net = _tiny('hspan')
    model_file = tmp_path / 'tiny.pt'
    write_checkpoint(model_file, net.state_dict(), {'model': 'hspan', **net.config})
    out = tmp_path / 'tiny.onnx'
    assert export.main(['--pre_train', str(model_file), str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'onnxruntime check at 29x27' in printed
    assert float(printed.rsplit('max |onnx - torch| = ', 1)[1].split()[0]) <= 1e-5
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta['sr_config']) == json.loads(json.dumps({'model': 'hspan', **net.config}))
    assert (meta['model'], meta['scale'], meta['rgb_range']) == ('hspan', '2', '1')

    bad = tmp_path / 'bad.onnx'
    assert export.main(['--pre_train', str(model_file), str(bad), '--n_feats', '8']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--n_feats 8 contradicts' in err[0] and not bad.exists()


@pytest.mark.parametrize('name,flags', [
    ('NLSN', ['--n_resblocks', '2', '--n_feats', '8', '--chunk_size', '16', '--n_hashes', '1']),
    ('PAEDSR', ['--n_resblocks', '2', '--n_feats', '8']),
    ('CSNLN', ['--n_feats', '8', '--depth', '1']),
    ('MDSR', ['--n_resblocks', '1', '--n_feats', '8', '--scale', '2+3']),
    ('SAN', ['--n_resgroups', '1', '--n_resblocks', '1', '--n_feats', '16', '--reduction', '4']),
])
def test_networks_a_trace_cannot_record_are_refused_before_writing(tmp_path, capsys, name: str,
                                                                  flags: list[str]) -> None:
    from nlsr import option
    from nlsr.model import make_network
    from nlsr.tools import export

    args = option.parse(['--model', name, '--test_only', '--cpu', *flags])
    net = make_network(args)
    model_file = tmp_path / 'tiny.pt'
    write_checkpoint(model_file, net.state_dict(), {'model': name, **net.config})
    out = tmp_path / 'tiny.onnx'
    assert export.main(['--pre_train', str(model_file), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{name} cannot be exported to ONNX' in err[0] and not out.exists(), err
