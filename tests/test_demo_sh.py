"""demo.sh: every main.py command in it parses, and the seed's two commands are there verbatim.

Running the demos takes minutes to hours; a flag renamed in option.py would otherwise only show up then.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nlsr import model, option

DEMO = Path(__file__).resolve().parents[1] / 'demo.sh'

SEED_COMMANDS = (
    'python main.py --dir_data ../../SrTrainingData --data_range 1-800/1-5 --n_GPUs 1 --rgb_range 1 --save_models '
    '--lr 1e-4 --decay 200-400-600-800 --epochs 1000 --chop --save_results --data_test Set5 --n_resgroups 10 '
    '--n_resblocks 4 --n_feats 192 --reduction 2 --topk 128 --res_scale 0.1 --batch_size 16 --model HSPAN '
    '--scale 2 --patch_size 96 --save HSPAN_x2 --data_train DIV2K',
    'python main.py --dir_data ../../ --data_test Set5+Set14+B100+Urban100+Manga109 --n_GPUs 1 --rgb_range 1 '
    '--save_models --save_results --n_resgroups 10 --n_resblocks 4 --n_feats 192 --reduction 2 --topk 128 '
    '--res_scale 0.1 --model HSPAN --save HSPAN_x4_results --chop --data_range 1-800/1-5 --scale 4 --test_only '
    '--pre_train ../experiment/HSPAN_x4/model/HSPAN_x4.pt',
)


def _logical_lines(text: str) -> list[str]:
    return text.replace('\\\n', ' ').splitlines()


def _main_commands() -> list[tuple[str, list[str]]]:
    """(function name, main.py arguments) for each main.py call, with shell variables made concrete."""
    text = DEMO.read_text()
    arrays = {m.group(1): shlex.split(m.group(2).replace('\\\n', ' '))
              for m in re.finditer(r'^(\w+)=\((.*?)\)', text, re.S | re.M)}
    assert 'CPU_RECIPE' in arrays, 'demo.sh defines CPU_RECIPE=(...)'
    found, function = [], ''
    for line in _logical_lines(text):
        if m := re.match(r'^(\w+)\(\) \{', line):
            function = m.group(1)
        if 'main.py' not in line or line.lstrip().startswith('#'):
            continue
        words = shlex.split(line.split('main.py', 1)[1].split('>')[0])
        argv = []
        for w in words:
            if m := re.fullmatch(r'\$\{(\w+)\[@\]\}', w):
                argv += arrays[m.group(1)]
            elif w != '$@':
                argv.append(w.replace('$data', '/tmp/data').replace('$att', 'hspa').replace('$seed', '2'))
        found.append((function, argv))
    return found


def test_seed_commands_verbatim() -> None:
    lines = [ln.strip() for ln in _logical_lines(DEMO.read_text())]
    for cmd in SEED_COMMANDS:
        assert cmd in lines


@pytest.mark.parametrize('function, argv', _main_commands(), ids=lambda v: v if isinstance(v, str) else '')
def test_every_main_command_parses(function: str, argv: list[str]) -> None:
    args = option.parse_flags(argv)  # the flags alone: the demos' checkpoints are downloads
    model.check_model_flags(args)  # no model flag the model would ignore
    if function in ('quick', 'cpu_recipe', 'ablation', 'ablation_run') and not args.test_only:
        # The CPU demos anneal to the end of their own budget.
        assert args.lr_schedule == 'cosine' and args.warmup > 0 and args.epochs < 10


def test_all_functions_found() -> None:
    functions = {f for f, _ in _main_commands()}
    assert functions == {'hspan_train', 'hspan_test', 'msnlan_train', 'msnlan_test', 'quick', 'cpu_recipe',
                         'ablation', 'ablation_run'}


def test_quick_demo_data_ships_with_the_repo(tmp_path: Path) -> None:
    """`demo.sh quick` needs no download: T91 and Set5 (with its x2 LR files) are in datasets/."""
    from nlsr.data import make_dataset

    root = DEMO.parent / 'datasets'
    args = option.parse(['--dir_data', str(root), '--dir_cache', str(tmp_path), '--scale', '2',
                         '--patch_size', '48', '--data_train', 'T91', '--data_test', 'Set5', '--ext', 'img'])
    train = make_dataset('T91', args, train=True, log=lambda _: None)
    test = make_dataset('Set5', args, train=False, log=lambda _: None)
    assert len(train.hr_files) == 91
    assert len(test.hr_files) == 5 and all(p is not None for p in test.lr_files[2])
