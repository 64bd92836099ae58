#!/usr/bin/env bash
# Published commands, and a quick CPU demo.
#
#   bash demo.sh quick          # from anywhere: small HSPAN trained on scikit-image's photos, scored on Set5 x2
#   bash demo.sh hspan_train    # the published HSPAN commands (run in src/, as published: paths are
#   bash demo.sh hspan_test     #   relative to src/, e.g. ../../SrTrainingData next to this repository)
#   bash demo.sh msnlan_train
#   bash demo.sh msnlan_test
#
# Results go to experiment/<save>/ at the repository root (log.txt, results.json, plots, model/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

hspan_train() {
    cd "$ROOT/src"
    # Train HSPAN x2 on DIV2K (published command, verbatim).
    python main.py --dir_data ../../SrTrainingData --data_range 1-800/1-5 --n_GPUs 1 --rgb_range 1 --save_models --lr 1e-4 --decay 200-400-600-800 --epochs 1000 --chop --save_results --data_test Set5 --n_resgroups 10 --n_resblocks 4 --n_feats 192 --reduction 2 --topk 128 --res_scale 0.1 --batch_size 16 --model HSPAN --scale 2 --patch_size 96 --save HSPAN_x2 --data_train DIV2K
}

hspan_test() {
    cd "$ROOT/src"
    # Test HSPAN x4 on Set5, Set14, B100, Urban100, Manga109 (published command, verbatim).
    python main.py --dir_data ../../ --data_test Set5+Set14+B100+Urban100+Manga109 --n_GPUs 1 --rgb_range 1 --save_models --save_results --n_resgroups 10 --n_resblocks 4 --n_feats 192 --reduction 2 --topk 128 --res_scale 0.1 --model HSPAN --save HSPAN_x4_results --chop --data_range 1-800/1-5 --scale 4 --test_only --pre_train ../experiment/HSPAN_x4/model/HSPAN_x4.pt
}

msnlan_train() {
    cd "$ROOT/src"
    # Train MSNLAN x4 on DIV2K with the defaults of the published MSNLAN option.py (its template MSDSN:
    # 8 groups x 9 blocks, 64 features, lr 2e-4, 1200 epochs, patch 192, batch 16).
    python main.py --template MSNLAN --dir_data ../../SrTrainingData --data_train DIV2K --data_test Set5 --data_range 1-800/801-810 --scale 4 --patch_size 192 --batch_size 16 --lr 2e-4 --decay 1200 --epochs 1200 --save_models --save MSNLAN_x4
}

msnlan_test() {
    cd "$ROOT/src"
    # Test MSNLAN x4 on the five benchmark sets (released weights: see the MSNLAN README).
    python main.py --template MSNLAN --dir_data ../../ --data_test Set5+Set14+B100+Urban100+Manga109 --scale 4 --save_results --test_only --pre_train ../experiment/MSNLAN_x4/model/MSNLAN_x4.pt --save MSNLAN_x4_results
}

quick() {
    cd "$ROOT"
    local data="$ROOT/experiment/quick_data"
    local start=$SECONDS
    # Training images: the photographs bundled with scikit-image; test set: the Set5 copy in datasets/.
    "$PYTHON" src/prepare_quick_data.py "$data" --set5 "$ROOT/datasets/benchmark/Set5"
    # A small HSPAN (about 0.15M parameters). Training patches of 1024 LR pixels are cheap for the dense
    # HSPA; whole Set5 images are evaluated on 48x48 LR tiles (--tile) so attention stays small on a CPU.
    "$PYTHON" src/main.py --reset --save quick --model HSPAN --scale 2 --rgb_range 1 \
        --n_resgroups 2 --n_resblocks 2 --n_feats 32 --reduction 2 --topk 32 --res_scale 0.1 \
        --hspa_impl dense --tile 48 --tile_overlap 8 \
        --dir_data "$data" --data_train SKImage --data_test Set5 \
        --patch_size 64 --batch_size 16 --lr 1e-3 --epochs 3 --decay 2 --gamma 0.5 --test_every 60 \
        --print_every 20 --n_threads 1 --save_results --save_gt "$@"
    # Bicubic on the same pipeline, for the comparison.
    "$PYTHON" src/main.py --reset --save quick_bicubic --model Bicubic --scale 2 --rgb_range 1 \
        --dir_data "$data" --data_test Set5 --test_only --n_threads 1 > /dev/null
    "$PYTHON" src/make_table.py experiment/quick_bicubic experiment/quick --names Bicubic HSPAN-quick \
        --out experiment/quick/table.md
    echo "quick demo: $((SECONDS - start)) s; experiment/quick/ holds results.json, table.md, plots, images"
}

case "${1:-}" in
    quick) shift; quick "$@" ;;
    hspan_train|hspan_test|msnlan_train|msnlan_test) "$1" ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac
