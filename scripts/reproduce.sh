#!/usr/bin/env bash
# Rerun the papers' experiments as recorded in REPRODUCTION.md (shortened schedules, CPU).
# Usage: LOWPREC_DATA=/path/to/data bash scripts/reproduce.sh [park|courbariaux|courbariaux_seed1|sweep_reference|sweep_bits|sweep_rate|sweep_radix|
#        mpt|wrpn|wrpn_long|wrpn_bits|wrpn_wide3|wrpn_16|lstm|gpt_scaled|gan]...   (COUR_EPOCHS=25 and WRPN_SEEDS="0 1 2" by default)
# The data folder holds mnist/, fashion-mnist/ and spoken-digits/ (see `lowprec data list`).
# Each experiment writes runs/repro/<name>/ (results.csv, convergence.png, per-recipe metrics) and a log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/repro}
mkdir -p "$OUT"
# RESUME=1 continues interrupted runs from their checkpoints (finished ones are read back, not retrained)
run() { local name=$1; shift; "$PY" -m lowprec "$@" --out "$OUT/$name" ${RESUME:+--resume} 2>&1 | tee -a "$OUT/$name.log"; }

park() {        # Park et al. Table 1: MNIST LeNet, fp32 / int8 / int8-lazy
  run park-lenet compare --task mnist-lenet --recipes fp32 int8 int8-lazy --epochs 5 --seed 0
}
FP16_ALL="params=fp16,activations=fp16,grads=fp16,master=fp16,optimizer_state=fp16"
courbariaux() { # Courbariaux et al.: PI-MNIST maxout MLP, the authors' protocol (50k/10k, best validation epoch,
                # lr 0.05 -> 0.005 at half the epochs, momentum 0.5 -> 0.7, 2-epoch warm-up of dfx exponents)
  run courbariaux-pimnist compare --task pimnist-maxout --epochs "${COUR_EPOCHS:-25}" --seed 0 \
    --checkpoint-every 100 --recipes fp32 "$FP16_ALL" fixed-20 dfx-10-12 \
    "dfx-10-12+init_int_bits=5,exponent_interval=100"
}
courbariaux_seed1() { # the four formats again under another seed (initialisation, order, dropout)
  run courbariaux-pimnist-seed1 compare --task pimnist-maxout --epochs "${COUR_EPOCHS:-25}" --seed 1 \
    --checkpoint-every 100 --recipes fp32 dfx-10-12 "$FP16_ALL" fixed-20
}
# Courbariaux's three figures on a shortened schedule: 10,000 training images, 3 epochs, a 1-epoch warm-up
SWEEP_SCHEDULE=(--task pimnist-maxout --epochs 3 --train-limit 10000 --warmup-epochs 1 --seed 0)
sweep_reference() { # float32 and the fixed-20 / dfx-10-12 presets on the sweeps' schedule, for reference
  run sweep-reference compare "${SWEEP_SCHEDULE[@]}" --recipes fp32 fixed-20 dfx-10-12
}
sweep_bits() {  # test error vs propagation x update bit widths (dynamic fixed point)
  run sweep-dfx-bits sweep "${SWEEP_SCHEDULE[@]}" --template "dfx-{p}-{u}" --values p=4,5,6,8,10,12 u=8,10,12,14
}
sweep_rate() {  # test error vs the maximum overflow rate (dfx 10/12)
  run sweep-dfx-rate sweep "${SWEEP_SCHEDULE[@]}" --template "dfx-10-12+max_overflow_rate={r}" \
    --values r=1e-6,1e-5,1e-4,1e-3,1e-2,1e-1
}
sweep_radix() { # test error vs the radix point of 20-bit fixed point (f fraction bits: 19 - f integer bits)
  run sweep-fixed-radix sweep "${SWEEP_SCHEDULE[@]}" --template \
    "params=fixed<20,{f}>,activations=fixed<20,{f}>,grads=fixed<20,{f}>,master=fixed<20,{f}>,optimizer_state=fixed<20,{f}>" \
    --values f=8,10,12,13,14,15,16,18
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
wrpn_long() {   # the claim itself (2x wide at 4/4 vs 1x fp32), linear lr decay to lr/10, seeds $WRPN_SEEDS
  for seed in ${WRPN_SEEDS:-0 1 2}; do
    run "wrpn-fashion-decay-seed$seed" compare --task fashion-cnn --epochs 8 --schedule linear --seed "$seed" \
      --train-limit 10000 --recipes fp32 wrpn-4-4+width=2
  done
}
wrpn_bits() {   # the other widths and bit widths on the same schedule, seed 0
  run wrpn-fashion-decay-bits compare --task fashion-cnn --epochs 8 --schedule linear --seed 0 \
    --train-limit 10000 --recipes wrpn-4-4 fp32+width=2 wrpn-2-4+width=2 wrpn-4-2+width=2 wrpn-2-2+width=2
}
wrpn_wide3() {  # 3x wide at 32/32 and 4/4 bits on the same schedule, seed 0
  run wrpn-fashion-decay-wide3 compare --task fashion-cnn --epochs 8 --schedule linear --seed 0 \
    --train-limit 10000 --recipes fp32+width=3 wrpn-4-4+width=3
}
wrpn_16() {     # the claim on twice the epochs (16), seed 0: does the 4/4 gap keep closing?
  run wrpn-fashion-decay-16 compare --task fashion-cnn --epochs 16 --schedule linear --seed 0 \
    --train-limit 10000 --recipes fp32 wrpn-4-4+width=2
}
lstm() {        # Park et al. Table 4 shape: LSTM on spoken digits, fp32 / int8 / int8-lazy
  # Adam's moments in INT16, as Park et al. require for Adam (beta2 = 0.999 underflows INT8)
  run park-lstm compare --task digits-lstm --epochs 15 --seed 0 --recipes fp32 int8+optimizer_state=int16 \
    int8-lazy+optimizer_state=int16
}
gpt_scaled() {  # beyond the papers: the char-level GPT under the scaled formats, beside bf16 and unscaled fp8
  run gpt-scaled compare --task text-gpt --seed 0 --recipes fp32 mixed-bf16 fp8-hybrid fp8-e4m3 fp8-current \
    fp8-delayed mxfp8 mxfp4 nvfp4
  run gpt-scaled-nvfp4-no-rht compare --task text-gpt --seed 0 --recipes "nvfp4+wgrad_rht=off"
  for recipe in fp8-e4m3 fp8-current mxfp8 mxfp4 nvfp4; do
    "$PY" -m lowprec inspect text-gpt --recipe "$recipe" --steps 1 --batch 32 --out "$OUT/gpt-scaled-inspect/$recipe" \
      2>&1 | tee -a "$OUT/gpt-scaled-inspect.log"
  done
}

gan() {         # MPT and Park et al.: DCGAN on MNIST, fp32 / fp16 without loss scaling / int8 / int8-lazy, Adam at
  # Park's GAN settings (lr 1e-4, betas (0.5, 0.9), eps 1e-3); scored with a LeNet trained here (scores.csv, samples.png)
  run gan gan --epochs 6 --train-limit 20000 --seed 0
}

for experiment in "${@:-park courbariaux courbariaux_seed1 sweep_reference sweep_bits sweep_rate sweep_radix mpt wrpn wrpn_long wrpn_bits wrpn_wide3 wrpn_16 lstm gpt_scaled gan}"; do
  for e in $experiment; do "$e"; done
done
