#!/usr/bin/env bash
# The figures of docs/BENCHMARKS.md, in sequence, on a quiet machine: about 5 hours on 2 cores (the 30-minute
# run, DDPM's 1,000-step reference in the samplers figure ~40 min, the serving soak 10 min, a 15-minute
# text-to-image run, a 5-minute fine-tuning base, an 11-minute masked image model). Each command is the one its
# section of BENCHMARKS.md gives.
#   bash benchmarks/run_all.sh              results and logs under docs/bench/rerun/
#   LONG=0 bash benchmarks/run_all.sh       without the 30-minute run
# One-off measurements behind past decisions live in benchmarks/probes/ and are not run here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DITKIT=${DITKIT:-.venv/bin/ditkit}
OUT=${OUT:-docs/bench/rerun}
RUNS=${RUNS:-runs/bench}
LONG=${LONG:-1}
mkdir -p "$OUT" "$RUNS"
log() { echo "== $(date +%H:%M:%S) $*"; }
# the evaluation of the quality figures (n = 3,000), independent of any setting a run chose for itself
EVAL_DEMO="--num 3000 --compile --setting plain --sampler dpm++2m --autoguidance 2 --guidance-interval 0.6,inf --reject 0.08 --json"

log "the host's speed: the bare training step at batch 64"
$PY benchmarks/train_batch_throughput.py --batches 64 --rounds 2 --seconds 4 2>&1 | tee $OUT/host_speed.txt

log "training img/s against diffusers' DiT"
$PY benchmarks/train_throughput.py --rounds 3 --seconds 6 --compile 2>&1 | grep -v Warning | tee $OUT/throughput.txt

log "one MNIST epoch, DDPM eps, batch 128: time and peak memory"
rm -rf $RUNS/epoch
/usr/bin/time -v $DITKIT train --objective ddpm --batch-size 128 --epochs 1 --out $RUNS/epoch \
  --sample-every 0 --ckpt-every 0 --tune off --no-progress 2> $OUT/epoch_time.txt
grep -E "Elapsed|Maximum resident" $OUT/epoch_time.txt; tail -n 1 $RUNS/epoch/metrics.jsonl | tee -a $OUT/epoch_time.txt

log "quality after 10 CPU-minutes: the default recipe, autoguidance with rejection"
rm -rf $RUNS/m10
$DITKIT train --out $RUNS/m10 --max-minutes 10 --seed 33 --tune off --no-progress
$DITKIT eval --ckpt $RUNS/m10 $EVAL_DEMO 2>&1 | tee $OUT/quality_10min.json

if [ "$LONG" = 1 ]; then
  log "quality after 30 CPU-minutes"
  rm -rf $RUNS/m30
  $DITKIT train --out $RUNS/m30 --max-minutes 30 --seed 4 --tune off --no-progress
  $DITKIT eval --ckpt $RUNS/m30 $EVAL_DEMO 2>&1 | tee $OUT/quality_30min.json
  $PY benchmarks/held_out_loss.py $RUNS/m10 $RUNS/m30 2>&1 | tee $OUT/held_out_loss.txt
else
  $PY benchmarks/held_out_loss.py $RUNS/m10 2>&1 | tee $OUT/held_out_loss.txt
fi

log "samplers: steps against quality, against DDPM at 1,000 steps and the adaptive ODE solver"
$PY benchmarks/samplers.py --ckpt $RUNS/m10 --num 1000 --nfe 10,20,35 \
  --samplers dpm++2m,dpm++2m-sde,heun,heun+churn --cfg-scale 1 --out $OUT/samplers.json 2>&1 | tee $OUT/samplers.txt

log "latency of one guided image, eager and compiled"
$PY benchmarks/latency.py --ckpt $RUNS/m10 --repeats 60 --cfg-scale 1.35 --sampler dpm++2m-sde 2>&1 | tee $OUT/latency.txt
$PY benchmarks/latency.py --ckpt $RUNS/m10 --repeats 60 --cfg-scale 1.35 --sampler dpm++2m-sde --compile 2>&1 | tee $OUT/latency_compiled.txt

log "report build"
$PY benchmarks/report_build.py --run $RUNS/m10 2>&1 | tee $OUT/report.txt

log "serving: batched against unbatched at 32 clients, then the 10-minute soak; the CPU's ceiling"
$PY benchmarks/serve_load.py --ckpt $RUNS/m10 --levels 32 --duration-s 15 --guidance 1.35 \
  --out $OUT/serve.json 2>&1 | grep -v Warning | tee $OUT/serve.txt
$PY benchmarks/serve_load.py --ckpt $RUNS/m10 --levels 32 --duration-s 15 --soak-minutes 10 \
  --out $OUT/serve_soak10.json 2>&1 | grep -v Warning | tee $OUT/serve_soak10.txt
$PY benchmarks/serve_ceiling.py --ckpt $RUNS/m10 --cfg-scale 1.35 2>&1 | grep -v Warning | tee $OUT/serve_ceiling.txt

log "the house, and the run's own sampling setting"
$PY benchmarks/house.py 2>&1 | tee $OUT/house.txt
$PY benchmarks/tune_robustness.py --out $RUNS/tune_bench --steps 3000 5000 7500 10000 --num 3000 2>&1 \
  | tee $OUT/tune_robustness.txt

log "cost levers: INT8, gradient checkpointing, dynamic compute, best-of-N"
$PY benchmarks/int8.py --preset DiT-S/2 2>&1 | tee $OUT/int8_dit_s2.txt
$PY benchmarks/int8.py --preset DiT-T/4 2>&1 | tee $OUT/int8_dit_t4.txt
$PY benchmarks/int8.py --ckpt $RUNS/m10 2>&1 | tee $OUT/int8_trained.txt
$PY benchmarks/grad_checkpoint.py 2>&1 | tee $OUT/grad_checkpoint.txt
$PY benchmarks/dynamic_compute.py --ckpt $RUNS/m10 2>&1 | tee $OUT/dynamic_compute.txt
$PY benchmarks/best_of.py --ckpt $RUNS/m10 --out $OUT/best_of 2>&1 | tee $OUT/best_of.txt

log "text to image: a 15-minute MMDiT-T/4, then prompt adherence, the prompt cache, word-to-patch attention"
rm -rf $RUNS/t2i
$DITKIT train --model MMDiT-T/4 --captions mnist --max-minutes 15 --precision fp32 --out $RUNS/t2i --no-progress
$PY benchmarks/text_to_image.py quality $RUNS/t2i --per-prompt 1 --steps 12 --sampler dpm++2m --cfg-scale 3 2>&1 | tee $OUT/t2i_quality.txt
$PY benchmarks/text_to_image.py cache 2>&1 | tee $OUT/t2i_cache.txt
$PY benchmarks/text_to_image.py attention $RUNS/t2i --out $OUT/t2i_attention.png 2>&1 | tail -n 3

log "server robustness: schemathesis over the API, a retry storm"
$PY benchmarks/serve_fuzz.py --ckpt $RUNS/m10 --max-time-s 180 --out $OUT/serve_fuzz.json 2>&1 | tail -n 5
$PY benchmarks/serve_storm.py --ckpt $RUNS/m10 --rounds 3 --duration-s 8 --out $OUT/serve_storm.json 2>&1 | tee $OUT/serve_storm.txt

log "fine-tuning and diffusers interop: a 5-minute base, then 2-minute fine-tunes"
rm -rf $RUNS/ft_base
$DITKIT train --out $RUNS/ft_base --max-minutes 5 --no-compile --tune off --no-progress
$PY benchmarks/finetune.py --base $RUNS/ft_base --minutes 2 --work $RUNS/ft --json $OUT/finetune.json 2>&1 | tee $OUT/finetune.txt

log "DiT against U-Net: the speed columns (the quality curves: --quality-configs, see BENCHMARKS.md)"
$PY benchmarks/compare.py --out $OUT/compare --runs $RUNS/compare --configs all --minutes 0 --threads 1 2>&1 | tail -n 20

log "masked image model: a 5-minute tokenizer, a 6-minute MIM-T, then against DiT-T/4"
rm -rf $RUNS/vq $RUNS/mim
$DITKIT train-tokenizer --out $RUNS/vq --max-minutes 5 --batch-size 32 --threads 1 --no-progress
$DITKIT train --model MIM-T --tokenizer $RUNS/vq --max-minutes 6 --batch-size 32 --threads 1 --no-compile \
  --out $RUNS/mim --no-progress
$PY benchmarks/mim_vs_dit.py --mim $RUNS/mim --num 400 --json $OUT/mim_vs_dit.json 2>&1 | tee $OUT/mim_vs_dit.txt

log "scaling out: DDP, Ray Serve"
$PY benchmarks/ddp_throughput.py --out $OUT/ddp.json 2>&1 | tee $OUT/ddp.txt
$PY benchmarks/ray_serve.py --ckpt $RUNS/m10 --clients 8 --duration-s 10 --out $OUT/ray.json 2>&1 | tee $OUT/ray.txt

log done
