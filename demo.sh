#!/usr/bin/env bash
# Published commands, and a quick CPU demo.
#
#   bash demo.sh quick          # from anywhere: small HSPAN trained on T91 (in datasets/), scored on Set5 x2
#   bash demo.sh hspan_train    # the published HSPAN commands (run in src/, as published: paths are
#   bash demo.sh hspan_test     #   relative to src/, e.g. ../../SrTrainingData next to this repository)
#   bash demo.sh msnlan_train
#   bash demo.sh msnlan_test
#   bash demo.sh cpu_recipe     # small HSPAN on T91+BSD200 without a GPU (TRAIN_DATA=<folder with T91/ BSD200/>)
#   bash demo.sh ablation       # HSPA vs softmax vs no attention at equal budget on that recipe
#   bash demo.sh attention_ablation  # EDSR-baseline and HSPAN x none/softmax/hspa x 3 seeds: mean ± std
#   bash demo.sh paper_table CHECKPOINTS [--dir_data D]  # one folder per network (RCAN/, HSPAN/, ...) of
#                               released checkpoints -> the paper table (nlsr-paper-table --help)
#
# Results go to experiment/<save>/ at the repository root (log.txt, results.json, plots, model/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
# The tools run as modules of this checkout's package (installed or not: `pip install -e .` is the same code).
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

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
    local start=$SECONDS
    # Training images: T91 (datasets/T91, 91 photos); test set: the Set5 copy (datasets/benchmark/Set5).
    # A small HSPAN (one HSPAM of 6 LEBs, 48 features) for 900 batches of 16: LR 4e-3 after a 50-batch
    # warm-up, cosine-annealed to 0 (the final low-LR phase is where most of the PSNR comes). --topk 128 (the
    # published value) only changes where the exact threshold search starts: fastest for these scores.
    # Two single-threaded processes (DDP, gloo; 8 patches each, the same steps as one process): 1.05x the
    # speed of one process with 2 threads (benchmarks/cpu_processes.py).
    # QUICK_PROCS=N for N processes (16 must divide by N). Set5 is evaluated with --chop, as published.
    # --channels_last: oneDNN's faster convolutions, which dominate the step (benchmarks/README.md).
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone \
        --nproc_per_node "${QUICK_PROCS:-2}" src/main.py --cpu --reset --save quick --model HSPAN --scale 2 \
        --rgb_range 1 --n_resgroups 1 --n_resblocks 6 --n_feats 48 --reduction 2 --topk 128 --res_scale 1 \
        --dir_data datasets --data_train T91 --data_test Set5 --ext sep --dir_cache experiment/quick_cache \
        --patch_size 48 --batch_size 16 --lr 4e-3 --lr_schedule cosine --warmup 50 --epochs 1 \
        --test_every 900 --print_every 25 --n_threads 0 --chop --channels_last --save_results --save_gt "$@"
    # Bicubic on the same pipeline, for the comparison.
    "$PYTHON" src/main.py --reset --save quick_bicubic --model Bicubic --scale 2 --rgb_range 1 --save_results \
        --dir_data datasets --data_test Set5 --dir_cache experiment/quick_cache --test_only --n_threads 1 > /dev/null
    "$PYTHON" -m nlsr.tools.make_table experiment/quick_bicubic experiment/quick --names Bicubic HSPAN-quick \
        --out experiment/quick/table.md
    echo "quick demo: $((SECONDS - start)) s; experiment/quick/ holds results.json, table.md, plots, images"
}

# T91 + BSD200 HR folders (e.g. ../shared/data/train) and the Set5 copy in datasets/, linked into one
# --dir_data so that --data_train T91+BSD200 --data_test Set5 finds both.
cpu_data() {
    local train="${TRAIN_DATA:-$ROOT/../shared/data/train}" data="$ROOT/experiment/cpu_data"
    [ -d "$train/T91" ] && [ -d "$train/BSD200" ] || { echo "TRAIN_DATA=$train has no T91/ and BSD200/" >&2; exit 2; }
    mkdir -p "$data/benchmark"
    ln -sfn "$(cd "$train" && pwd)/T91" "$data/T91"
    ln -sfn "$(cd "$train" && pwd)/BSD200" "$data/BSD200"
    ln -sfn "$ROOT/datasets/benchmark/Set5" "$data/benchmark/Set5"
    echo "$data"
}

# The quick demo's network and schedule on T91+BSD200, for a machine without a GPU: --attention
# hspa|softmax|none swaps the attention for the paper's ablation at the same budget. Set5 x2 is evaluated
# on 64-pixel LR tiles (softmax attention over a whole 256x256 LR image would need a 17 GB score matrix).
CPU_RECIPE=(--model HSPAN --scale 2 --rgb_range 1 --n_resgroups 1 --n_resblocks 6 --n_feats 48 --reduction 2
    --topk 128 --res_scale 1 --data_train T91+BSD200 --data_test Set5 --patch_size 48 --batch_size 16
    --lr 4e-3 --lr_schedule cosine --warmup 50 --print_every 100 --n_threads 0 --tile 64 --tile_overlap 16)

cpu_recipe() {
    cd "$ROOT"
    local data; data=$(cpu_data)
    # 2400 batches (4 epochs of 600, Set5 after each): about 50 minutes on one CPU core.
    OMP_WAIT_POLICY=PASSIVE "$PYTHON" src/main.py --reset --save cpu_hspan "${CPU_RECIPE[@]}" --dir_data "$data" \
        --dir_cache "$data/cache" --epochs 4 --test_every 600 "$@"
}

ablation() {
    cd "$ROOT"
    local data; data=$(cpu_data)
    # 900 batches each (3 epochs of 300, Set5 after each), the quick demo's budget.
    for att in hspa softmax none; do
        OMP_WAIT_POLICY=PASSIVE "$PYTHON" src/main.py --reset --save "ablation_$att" "${CPU_RECIPE[@]}" \
            --attention "$att" --dir_data "$data" --dir_cache "$data/cache" --epochs 3 --test_every 300 "$@"
    done
    "$PYTHON" -m nlsr.tools.make_table experiment/ablation_hspa experiment/ablation_softmax experiment/ablation_none \
        --names HSPA softmax none --out experiment/ablation_table.md
    "$PYTHON" -m nlsr.tools.make_figures ablation experiment/ablation_hspa experiment/ablation_softmax \
        experiment/ablation_none --names HSPA softmax none --set Set5 --scale 2 --baseline 33.67
}

# HSPA as a general building block. EDSR-baseline (16 blocks, 64 features; --attention hspa|softmax adds one
# after blocks 8 and 16, none is the published EDSR) and the CPU recipe's HSPAN, each with --attention
# none/softmax/hspa and seeds 1 2 3 (SEEDS="..." to change), at the ablation's budget (900 batches, cosine;
# EDSR at LR 1e-3, not tuned). JOBS=N trains N runs at once, one thread each (each run's output goes to
# its experiment/<save>/log.txt). Writes experiment/attention_ablation_table.md (mean ± sample std over
# the seeds) and Figs/attention_ablation_*.png (Set5 x2 PSNR against iterations, standard-deviation bars).
EDSR_RECIPE=(--template EDSR --scale 2 --rgb_range 1 --data_train T91+BSD200
    --data_test Set5 --patch_size 48 --batch_size 16 --lr 1e-3 --lr_schedule cosine --warmup 50 --print_every 100
    --n_threads 0 --tile 64 --tile_overlap 16)

ablation_run() {  # NET (edsr|hspan) ATTENTION SEED DATA [flags]: one run of attention_ablation
    local net=$1 att=$2 seed=$3 data=$4; shift 4
    if [ "$net$att" = edsrnone ]; then  # the published EDSR takes no attention flags
        "$PYTHON" src/main.py --reset --save "abl_edsr_none_s$seed" "${EDSR_RECIPE[@]}" --attention none \
            --seed "$seed" --dir_data "$data" --dir_cache "$data/cache" --epochs 3 --test_every 300 "$@"
    elif [ "$net" = edsr ]; then
        "$PYTHON" src/main.py --reset --save "abl_edsr_${att}_s$seed" "${EDSR_RECIPE[@]}" --attention "$att" \
            --reduction 2 --topk 128 --seed "$seed" --dir_data "$data" --dir_cache "$data/cache" --epochs 3 \
            --test_every 300 "$@"
    else
        "$PYTHON" src/main.py --reset --save "abl_hspan_${att}_s$seed" "${CPU_RECIPE[@]}" --attention "$att" \
            --seed "$seed" --dir_data "$data" --dir_cache "$data/cache" --epochs 3 --test_every 300 "$@"
    fi
}

attention_ablation() {
    cd "$ROOT"
    local data; data=$(cpu_data)
    local jobs="${JOBS:-1}" edsr=() edsr_names=() hspan=() hspan_names=() seed att
    for seed in ${SEEDS:-1 2 3}; do
        for att in none softmax hspa; do
            edsr+=("experiment/abl_edsr_${att}_s$seed"); edsr_names+=("EDSR-baseline-$att")
            hspan+=("experiment/abl_hspan_${att}_s$seed"); hspan_names+=("HSPAN-$att")
            for net in edsr hspan; do
                if [ "$jobs" -le 1 ]; then
                    OMP_WAIT_POLICY=PASSIVE ablation_run "$net" "$att" "$seed" "$data" "$@"
                else
                    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
                    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 ablation_run "$net" "$att" "$seed" "$data" "$@" \
                        > /dev/null &
                fi
            done
        done
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; done
    "$PYTHON" -m nlsr.tools.make_table "${edsr[@]}" "${hspan[@]}" --names "${edsr_names[@]}" "${hspan_names[@]}" \
        --out experiment/attention_ablation_table.md
    "$PYTHON" -m nlsr.tools.make_figures ablation "${edsr[@]}" --names "${edsr_names[@]}" --set Set5 --scale 2 \
        --baseline 33.67 --out Figs/attention_ablation_edsr.png
    "$PYTHON" -m nlsr.tools.make_figures ablation "${hspan[@]}" --names "${hspan_names[@]}" --set Set5 --scale 2 \
        --baseline 33.67 --out Figs/attention_ablation_hspan.png
}

case "${1:-}" in
    quick) shift; quick "$@" ;;
    hspan_train|hspan_test|msnlan_train|msnlan_test) "$1" ;;
    cpu_recipe|ablation|attention_ablation) cmd=$1; shift; "$cmd" "$@" ;;
    paper_table) shift; cd "$ROOT"; "$PYTHON" -m nlsr.tools.paper_table "$@" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
