#!/usr/bin/env bash
# Trains seed runs of a recipe and its control side by side on one machine (the GPU machine lent to a session:
# one H200 ran four at once), on a pack of the default bundle's split (python -m training.pack … --out .pack),
# and leaves each run's kept weights as a float16 state dict in $OUT, with the logs, for `chestaid compare-runs`
# here (unpack logs.tar.gz, copy <run>.pt to runs/<run>/best.pt and the bundle's split.csv beside it).
#
#   KIND=finetune|scratch  SCHED=224:5  TLIMIT=420 (seconds a run may take)  THREADS=4  OUT=/tmp/out  PY=python3
# finetune: from the default's weights at lr 1e-4, patience 2; scratch: from random weights at lr 1e-3, patience 3.
# Runs: robust recipe at seeds 0, 1, 2 and the basic recipe (no label smoothing, no EMA) at one seed; or
# RUNS="name:seed:augment:label-smoothing:ema …" (names start with ft_ or sc_ as KIND) for pieces of a recipe.
set -u
PY=${PY:-python3}; KIND=${KIND:-finetune}; SCHED=${SCHED:-224:5}; TLIMIT=${TLIMIT:-420}; THREADS=${THREADS:-4}
OUT=${OUT:-/tmp/seed-runs}; SPLIT=${SPLIT:-models/default/split.csv}
case $KIND in
  finetune) INIT=models/default/model.safetensors LR=1e-4 PATIENCE=2 P=ft BASIC_SEED=0 ;;
  scratch) INIT=none LR=1e-3 PATIENCE=3 P=sc BASIC_SEED=1 ;;  # the default itself is the basic recipe at seed 0
  *) echo "KIND must be finetune or scratch" >&2; exit 2 ;;
esac
mkdir -p "$OUT" runs
if [ -d .whl ] && ! $PY -c "import pydicom" 2>/dev/null; then  # the GPU machine lacks pydicom: carried as a wheel
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null; lscpu | grep "Model name"; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"

start() {  # run-name seed augment label-smoothing ema
  mkdir -p runs/$1 && cp "$SPLIT" runs/$1/split.csv
  timeout "$TLIMIT" $PY -c "
from training.train import TrainConfig, main
main(TrainConfig(data='.pack', out='runs/$1', init='$INIT', schedule='$SCHED', lr=$LR, patience=$PATIENCE, seed=$2,
                 augment='$3', label_smoothing=$4, ema=$5, shift_films=200, threads=$THREADS))
" > runs/$1/stdout.log 2>&1 &
}
t0=$(date +%s)
RUNS=${RUNS:-"${P}_robust_s0:0:robust:0.05:0.998 ${P}_robust_s1:1:robust:0.05:0.998 ${P}_robust_s2:2:robust:0.05:0.998 \
${P}_basic_s$BASIC_SEED:$BASIC_SEED:basic:0.0:0"}
for run in $RUNS; do IFS=: read -r name seed aug ls ema <<< "$run"; start $name $seed $aug $ls $ema; done
wait
echo "runs took $(( $(date +%s) - t0 )) s"
for r in $(for run in $RUNS; do echo runs/${run%%:*}; done); do
  tr "\r" "\n" < $r/stdout.log | grep -v "it/s\|s/it\|^ *$" | tail -12
  $PY -c "
import torch; sd = torch.load('$r/best.pt', map_location='cpu', weights_only=True)
torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, '$OUT/$(basename $r).pt')
" || echo "no best.pt in $r"
done
tar czf "$OUT/logs.tar.gz" $(for run in $RUNS; do n=runs/${run%%:*}; echo $n/train_log.jsonl $n/train_config.json $n/stdout.log; done)
ls -la "$OUT"
