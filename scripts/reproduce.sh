#!/usr/bin/env bash
# Rerun the papers' experiments as recorded in REPRODUCTION.md (shortened schedules, CPU).
# Usage: LOWPREC_DATA=/path/to/data bash scripts/reproduce.sh [park|courbariaux|mpt|wrpn|wrpn_long|lstm]...
# The data folder holds mnist/, fashion-mnist/ and spoken-digits/ (see `lowprec data list`).
# Each experiment writes runs/repro/<name>/ (results.csv, convergence.png, per-recipe metrics) and a log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/repro
mkdir -p "$OUT"
run() { local name=$1; shift; "$PY" -m lowprec "$@" --out "$OUT/$name" 2>&1 | tee "$OUT/$name.log"; }

park() {        # Park et al. Table 1: MNIST LeNet, fp32 / int8 / int8-lazy
  run park-lenet compare --task mnist-lenet --recipes fp32 int8 int8-lazy --epochs 5 --seed 0
}
courbariaux() { # Courbariaux et al.: PI-MNIST maxout MLP, fp32 / fp16 / fixed-20 / dfx-10-12
  run courbariaux-maxout compare --task pimnist-maxout --epochs 5 --seed 0 --recipes fp32 \
    "params=fp16,activations=fp16,grads=fp16,master=fp16,optimizer_state=fp16" fixed-20 dfx-10-12
}
mpt() {         # Micikevicius et al.: gradients below the fp16 range, with and without loss scaling
  "$PY" -m lowprec underflow --task mnist-cnn-underflow --batches 8 --scales 1 8 256 4096 65536 \
    2>&1 | tee "$OUT/mpt-underflow-census.log"
  run mpt-underflow compare --task mnist-cnn-underflow --epochs 2 --seed 0 --train-limit 10000 --recipes fp32 \
    mixed-fp16+loss_scale=none mixed-fp16+loss_scale=8 mixed-fp16+loss_scale=4096 mixed-fp16+loss_scale=65536 \
    mixed-fp16
}
wrpn() {        # Mishra et al.: widths 1x/2x at 32/32, 4/4, 2/4, 4/2 weight/activation bits
  run wrpn-fashion compare --task fashion-cnn --epochs 3 --seed 0 --train-limit 10000 --recipes \
    fp32 wrpn-4-4 wrpn-2-4 wrpn-4-2 fp32+width=2 wrpn-4-4+width=2 wrpn-2-4+width=2 wrpn-4-2+width=2
}
wrpn_long() {   # the claim itself (2x wide at 4/4 vs 1x fp32) on a longer schedule
  run wrpn-fashion-long compare --task fashion-cnn --epochs 6 --seed 0 --train-limit 20000 --recipes \
    fp32 wrpn-4-4 fp32+width=2 wrpn-4-4+width=2
}
lstm() {        # Park et al. Table 4 shape: LSTM on spoken digits, fp32 / int8 / int8-lazy
  # Adam's moments in INT16, as Park et al. require for Adam (beta2 = 0.999 underflows INT8)
  run park-lstm compare --task digits-lstm --epochs 15 --seed 0 --recipes fp32 int8+optimizer_state=int16 \
    int8-lazy+optimizer_state=int16
}

for experiment in "${@:-park courbariaux mpt wrpn wrpn_long lstm}"; do
  for e in $experiment; do "$e"; done
done
