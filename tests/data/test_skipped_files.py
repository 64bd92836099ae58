"""Files a dataset does not read (not an image, hidden, a dangling link, too small for the patch) are named in
the run's log with the reason, the first few of them, and counted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataset_files import edsr_set, make_args, rand_image, write
from nlsr import data
from nlsr.data import common
from nlsr.errors import UserError


def _junk(folder: Path) -> None:
    """A note, a hidden file, a file without suffix, a link to nothing and a sub-folder (not a file)."""
    (folder / 'notes.txt').write_text('x')
    (folder / '.DS_Store').write_bytes(b'\0')
    (folder / 'README').write_text('x')
    os.symlink(folder / 'gone.png', folder / 'link.png')
    (folder / 'sub').mkdir()


def test_scan_images_says_why_each_file_is_skipped(tmp_path: Path) -> None:
    write(tmp_path / 'a.PNG', rand_image(4, 4))
    _junk(tmp_path)
    images, skipped = common.scan_images(tmp_path)
    assert [p.name for p in images] == ['a.PNG']
    assert [(p.name, why) for p, why in skipped] == [
        ('.DS_Store', 'hidden'), ('README', 'no image suffix'), ('link.png', 'a link to nothing'),
        ('notes.txt', 'not an image suffix: .txt')]
    assert common.list_images(tmp_path) == images


def test_note_names_the_first_few_and_counts_all(tmp_path: Path) -> None:
    skipped = [(tmp_path / f'f{i}.txt', 'why') for i in range(common.SKIPS_NAMED + 3)]
    note = common.skip_note('Set', skipped)
    assert note.startswith(f'Set: skipped {common.SKIPS_NAMED + 3} file(s) in {tmp_path}: f0.txt (why); ')
    assert f'f{common.SKIPS_NAMED - 1}.txt (why); and 3 more' in note
    assert f'f{common.SKIPS_NAMED}.txt' not in note and '\n' not in note


def test_training_folder_logs_non_images_and_too_small_images(tmp_path: Path) -> None:
    folder = tmp_path / 'Mixed'
    write(folder / 'big.png', rand_image(30, 30))
    write(folder / 'small.png', rand_image(20, 30))
    _junk(folder)
    logs: list[str] = []
    d = data.Data(make_args(tmp_path, '--data_train', 'Mixed', '--data_test', 'Mixed'), log=logs.append)
    assert [p.name for p in d.loader_train.dataset.datasets[0].hr_files] == ['big.png']
    skips = [line for line in logs if 'skipped' in line]
    assert skips[0] == (f'Mixed: skipped 4 file(s) in {folder}: .DS_Store (hidden); README (no image suffix); '
                        'link.png (a link to nothing); notes.txt (not an image suffix: .txt)')
    assert skips[1] == f'Mixed: skipped 1 of 2 images smaller than --patch_size 24 in {folder}: small.png (30x20)'
    assert skips[2].startswith('Mixed: skipped 4 file(s)')  # the test set reads the same folder
    assert len(skips) == 3  # a test set keeps images smaller than the patch


def test_benchmark_div2k_and_demo_folders_log_what_they_skip(tmp_path: Path) -> None:
    base = edsr_set(tmp_path, n=1)
    (base / 'HR' / 'img_0.png.bak').write_bytes(b'x')
    div2k = tmp_path / 'DIV2K' / 'DIV2K_train_HR'
    for k in (1, 2):
        write(div2k / f'{k:04d}.png', rand_image(30, 30, seed=k))
    (div2k / 'Thumbs.db').write_bytes(b'x')
    demo = tmp_path / 'demo'
    write(demo / 'lr.png', rand_image(8, 8))
    (demo / 'lr.png.txt').write_text('caption')
    logs: list[str] = []
    args = make_args(tmp_path, '--data_train', 'DIV2K', '--data_test', 'Set5+Demo', '--dir_demo', str(demo),
                     '--data_range', '1-2/1-2')
    data.Data(args, log=logs.append)
    skips = [line for line in logs if 'skipped' in line]
    assert skips == [f'DIV2K: skipped 1 file(s) in {div2k}: Thumbs.db (not an image suffix: .db)',
                     f'Set5: skipped 1 file(s) in {base / "HR"}: img_0.png.bak (not an image suffix: .bak)',
                     f'Demo: skipped 1 file(s) in {demo}: lr.png.txt (not an image suffix: .txt)']


def test_a_folder_of_no_images_names_what_it_skipped(tmp_path: Path) -> None:
    folder = tmp_path / 'Raw'
    folder.mkdir()
    (folder / 'a.exr').write_bytes(b'x')
    with pytest.raises(UserError) as err:
        data.make_dataset('Raw', make_args(tmp_path, '--test_only', '--data_test', 'Raw'), train=False)
    assert str(err.value).endswith(f'; Raw: skipped 1 file(s) in {folder}: a.exr (not an image suffix: .exr)')


def test_an_unwritable_cache_is_said_in_the_log(tmp_path: Path) -> None:
    edsr_set(tmp_path, n=1, lr=False)
    (tmp_path / 'a_file').write_text('x')
    logs: list[str] = []
    args = make_args(tmp_path, '--data_train', 'Set5', dir_cache=tmp_path / 'a_file' / 'cache')
    ds = data.make_dataset('Set5', args, train=True, log=logs.append)
    assert not ds.cache_ok and any('cannot write the cache' in line for line in logs)


def test_the_run_log_names_skipped_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nlsr import main

    demo = tmp_path / 'demo'
    write(demo / 'lr.png', rand_image(8, 8))
    (demo / 'notes.txt').write_text('x')
    monkeypatch.setenv('SR_EXPERIMENT_ROOT', str(tmp_path / 'exp'))
    assert main.main(['--cpu', '--test_only', '--model', 'Bicubic', '--scale', '2', '--n_threads', '0',
                      '--data_test', 'Demo', '--dir_demo', str(demo), '--save', 'skips']) == 0
    log = (tmp_path / 'exp' / 'skips' / 'log.txt').read_text()
    assert f'Demo: skipped 1 file(s) in {demo}: notes.txt (not an image suffix: .txt)' in log
