#!/usr/bin/env bash
# The PLE paper's Fig. 7 at scale (examples/paper_sweep.toml), resumable and seeds-major: every correlation
# gets seed 0 before any gets seed 1, so an interrupted run already covers the whole curve. Rerun the same
# command to continue: finished runs are skipped, an interrupted one resumes from its last.pt.
#   bash examples/paper_sweep.sh [OUT=runs/paper_sweep] [ROWS=300000] [SEEDS=3]
set -euo pipefail
out=${1:-runs/paper_sweep}
rows=${2:-300000}
seeds=${3:-3}
plerec=${PLEREC:-plerec}
mkdir -p "$out"
[ -f "$out/base.parquet" ] || "$plerec" synth --out "$out/base.parquet" --rows "$rows" --correlation 0.5
for s in $(seq 1 "$seeds"); do
  for p in 0 1 0.4 0.8 0.2 0.6; do  # the ends of the curve first
    "$plerec" sweep examples/paper_sweep.toml --set "data.path=$(realpath "$out/base.parquet")" \
      --correlations "$p" --models single,shared_bottom,mmoe,cgc,ple --seeds "$s" --out "$out" >/dev/null
  done
done
# the whole table and plot from the finished runs (nothing is retrained)
"$plerec" sweep examples/paper_sweep.toml --set "data.path=$(realpath "$out/base.parquet")" \
  --correlations 0,0.2,0.4,0.6,0.8,1 --models single,shared_bottom,mmoe,cgc,ple --seeds "$seeds" --out "$out"
