#!/usr/bin/env bash
# Every figure of docs/BENCHMARKS.md, in sequence, on a quiet machine (about 40 minutes).
#   bash benchmarks/run_all.sh            results and logs under docs/bench/
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=docs/bench
mkdir -p "$OUT" runs/bench
log() { echo "== $(date +%H:%M:%S) $*"; }

log throughput vs diffusers
$PY benchmarks/train_throughput.py --rounds 3 --seconds 6 --compile 2>&1 | grep -v Warning | tee $OUT/throughput.txt

log one epoch, DDPM eps, batch 128, peak memory
rm -rf runs/bench/epoch
/usr/bin/time -v $PY -m ditkit train --objective ddpm --batch-size 128 --epochs 1 --out runs/bench/epoch \
  --sample-every 0 --ckpt-every 0 --no-progress 2> $OUT/epoch_time.txt
grep -E "Elapsed|Maximum resident" $OUT/epoch_time.txt; tail -n 1 runs/bench/epoch/metrics.jsonl

log what --batch-size auto measures here, and the batch it takes for 10 minutes
$PY benchmarks/auto_batch.py --minutes 10 --repeats 2 2>&1 | tee $OUT/auto_batch.txt

log demo: the default recipe for 10 minutes, then its guided samples
rm -rf runs/demo
$PY -m ditkit train --out runs/demo --max-minutes 10 --no-progress
$PY benchmarks/recipes.py --name demo --runs runs --eval-only --scales 1.5,1.75 --ag-scales 2,2.25 --out $OUT/recipes.jsonl
$PY benchmarks/recipes.py --name demo --runs runs --eval-only --sampler dpm++2m-sde --scales 1.25,1.35 --out $OUT/recipes.jsonl
cp runs/demo/loss.png $OUT/demo_loss.png; cp runs/demo/eval_grid_cfg1.75.png $OUT/demo_grid_cfg1.75.png
cp runs/demo/eval_grid_ag2.0.png $OUT/demo_grid_ag2.png

log the class mix of real digits against FID
$PY benchmarks/label_mix.py --num 3000 --draws 10 --out $OUT/label_mix.json 2>&1 | grep -v Warning | tee $OUT/label_mix.txt

log samplers
$PY benchmarks/samplers.py --ckpt runs/demo --num 1000 --nfe 10,20,35 --samplers dpm++2m,dpm++2m-sde,heun,heun+churn --cfg-scale 1 --out $OUT/samplers.json | tee $OUT/samplers.txt

log latency
$PY benchmarks/latency.py --ckpt runs/demo --repeats 100 2>&1 | tee $OUT/latency.txt
$PY benchmarks/latency.py --ckpt runs/demo --repeats 100 --compile 2>&1 | tee $OUT/latency_compiled.txt
$PY benchmarks/compile_ab.py --ckpt runs/demo 2>&1 | tee $OUT/compile_ab_fp32.json
$PY benchmarks/compile_ab.py --ckpt runs/demo --precision bf16 2>&1 | tee $OUT/compile_ab_bf16.json
$PY benchmarks/train_compile.py eager 2>&1 | tee $OUT/train_compile.txt
$PY benchmarks/train_compile.py compile 2>&1 | tee -a $OUT/train_compile.txt
$PY benchmarks/train_batch_throughput.py 2>&1 | tee $OUT/train_batch_throughput.txt
$PY benchmarks/attention_cpu.py 2>&1 | tee $OUT/attention_cpu.txt

log a training run: the time of its sample grid, fp32 and bf16
$PY benchmarks/train_grid.py --ckpt runs/demo 2>&1 | tee $OUT/train_grid.txt

log ways to compile the training step
$PY benchmarks/train_compile_variants.py 2>&1 | grep -E '^(default|regional|autotune):' | tee $OUT/train_compile_variants.txt

log serving
$PY benchmarks/serve_ceiling.py --ckpt runs/demo 2>&1 | grep -v Warning | tee $OUT/serve_ceiling.txt
$PY benchmarks/serve_load.py --ckpt runs/demo --levels 1,8,32,128 --duration-s 12 --soak-minutes 3 --out $OUT/serve.json 2>&1 | tee $OUT/serve.txt
$PY benchmarks/serve_load.py --ckpt runs/demo --modes batched-bf16,unbatched-fp32,batched-fp32,unbatched-bf16 --levels 1,32 --duration-s 15 --out $OUT/serve_precision.json 2>&1 | tee $OUT/serve_precision.txt
$PY benchmarks/serve_load.py --ckpt runs/demo --modes batched-bf16-compiled,unbatched-fp32-compiled,batched-bf16,unbatched-fp32 --levels 32 --duration-s 20 --sampler dpm++2m-sde --guidance 1.35 --out $OUT/serve_compiled.json 2>&1 | tee $OUT/serve_compiled.txt
$PY benchmarks/serve_load.py --ckpt runs/demo --modes batched,unbatched,batched-compiled,unbatched-compiled --levels 32 --duration-s 20 --out $OUT/serve_auto.json 2>&1 | tee $OUT/serve_auto.txt

log ddp
$PY benchmarks/ddp_throughput.py --out $OUT/ddp.json 2>&1 | tee $OUT/ddp.txt

log ray
$PY benchmarks/ray_serve.py --ckpt runs/demo --clients 8 --duration-s 15 --out $OUT/ray.json 2>&1 | tee $OUT/ray.txt

log report
$PY benchmarks/report_build.py --run runs/demo 2>&1 | tee $OUT/report.txt
log done
