#!/usr/bin/env bash
# The paper's tables on the glyph testbed (docs/results/glyph-grid.md), as resumable
# sweeps in the order they matter; `bash benchmarks/glyph_grid.sh eps4 eps1` runs those
# parts only, no argument runs every part. A rerun continues where a sweep stopped.
#
# Every cell: 10 clients with 10 of the 100 classes each (the paper's pathological
# split) unless said, 30 rounds, per-sample DP at the composed epsilon with every node
# declaring its true Poisson rate under the public bound 0.06, seeded noise; each
# method's learning rate is the validation search's choice (tune_lr.py, written to
# benchmarks/results/tune-glyphs/method-config.toml). Local-only CoOp runs at the
# same epsilon as the federated methods: "does federation help at all?".
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=docs/results/glyph-grid
LRS=benchmarks/results/tune-glyphs/method-config.toml
METHODS=promptfl,fedotp,fedpgp,dplora,dpfpl,local
SEEDS=0,1,2

sweep() {  # sweep NAME ARGS...: one part of the grid into $OUT/NAME
    local name=$1
    shift
    dpfpl sweep --out "$OUT/$name" --dataset font-glyphs --seeds "$SEEDS" --no-references \
        --set model=dpfpl-tiny-glyphs --set max-sample-rate=0.06 \
        --method-config "$LRS" --parallel 2 "$@"
}

part() {
    case $1 in
        eps4) sweep eps4 --methods "$METHODS" --epsilons 4 ;;
        eps1) sweep eps1 --methods "$METHODS" --epsilons 1 ;;
        nodp) sweep nodp --methods "$METHODS" --epsilons inf ;;
        paper) sweep paper --methods "$METHODS" --epsilons 0.1,0.4 --dp-mode paper ;;
        # the largest true rate over seeds 0-2 is 0.093 (`dpfpl sample-rate --dataset
        # font-glyphs --partitioner dirichlet --seed S`), so the bound is 0.1 here
        dirichlet) sweep dirichlet --methods "$METHODS" --epsilons 4 \
            --set partitioner=dirichlet --set dirichlet-alpha=0.3 --set max-sample-rate=0.1 ;;
        rank) sweep rank --methods dpfpl,dplora --epsilons 4 --ranks 8,1 ;;
        # every prompt starts as the hand-written template: 4 context vectors, the words of
        # "a photo of a" (an untrained prompt is zero-shot), so rank at most 4
        template) sweep template --methods "$METHODS" --epsilons 4 --ranks 2 \
            --set n-ctx=4 --set "ctx-init=a photo of a" ;;
        *) echo "unknown part '$1' (eps4 eps1 nodp paper dirichlet rank template)" >&2; exit 2 ;;
    esac
}

for name in "${@:-eps4 eps1 nodp paper dirichlet rank template}"; do
    for one in $name; do part "$one"; done
done
