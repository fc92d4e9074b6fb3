#!/usr/bin/env bash
# Rebuild the demo models in demo/ from ../shared/data with the project's own toolkit (CPU, seeded).
#
#   make demo-models                      # or: demo/recipe.sh
#   MEMDEC_DEMO_WORK=/tmp/w demo/recipe.sh  # where the intermediate files go (outside the repo)
#
# Stages: tokenizer (general text) → base and base-small (general + 1/10 of each domain) →
# per domain: datastore of the base's keys, IVF-PQ index, sparse kNN targets, a small memory trained
# from scratch on KL+CE → evaluation with both bases → float16 copies into demo/.
# Every stage is cached by the toolkit's build cache, so a re-run after a failure resumes.
set -euo pipefail

# The body is one function, parsed whole before it runs: editing this file mid-run cannot derail it.
main() {
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${MEMDEC_DATA:-$(cd "$REPO/.." && pwd)/shared/data}
WORK=${MEMDEC_DEMO_WORK:-$(cd "$REPO/.." && pwd)/runs/demo-recipe}
DEST=${MEMDEC_DEMO_DEST:-$REPO/demo}
MEMDEC=${MEMDEC:-$REPO/.venv/bin/memdec}
PY=${PY:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONHASHSEED=0

# Sizes and budgets (the table in docs/demo.md comes from these defaults).
BASE_STEPS=${BASE_STEPS:-250}        # 8 × 256 tokens per step
SMALL_STEPS=${SMALL_STEPS:-200}
MEM_TOKENS=${MEM_TOKENS:-150000}     # domain tokens per memory (datastore and training)
MEM_STEPS=${MEM_STEPS:-70}         # 8 × 256 tokens per step (see docs/demo.md: a longer-trained memory
                                     # makes this weak CPU-trained base useless instead of complementary)
K=${K:-256}
TAU=${TAU:-1.0}
EVAL_TOKENS=${EVAL_TOKENS:-20000}    # held-out tokens scored per domain

case "$WORK" in "$REPO"/*) echo "recipe: the work dir must lie outside the repository" >&2; exit 2;; esac
mkdir -p "$WORK"
TIMES=$WORK/times.txt
: > "$TIMES"
t() {
  local s; s=$(date +%s)
  "$@"
  echo "[time] $(( $(date +%s) - s )) s: ${*:1:4}" | tee -a "$TIMES"
}
START=$(date +%s)

t "$PY" "$REPO/demo/prepare_data.py" --data "$DATA" --out "$WORK/data" --every 10
[ -f "$WORK/tokenizer/tokenizer.json" ] || t "$MEMDEC" memory tokenizer --corpus "$DATA/general/train.txt" --out "$WORK/tokenizer" --vocab-size 8192 --quiet

train_lm() {  # name steps hidden layers heads; skipped when already trained with these settings
  if [ -f "$WORK/$1/model.safetensors" ] && [ "$(cat "$WORK/$1.args" 2>/dev/null)" = "$*" ]; then
    echo "[memdec] $1: trained with the same settings, skipped"; return
  fi
  "$MEMDEC" memory train --tokenizer "$WORK/tokenizer" --corpus "$WORK/data/base.txt" --beta 0 \
    --out "$WORK/$1" --arch llama --hidden-size "$3" --layers "$4" --heads "$5" --max-len 512 \
    --seq-len 256 --train-batch-size 8 --max-steps "$2" --lr 2e-3 --warmup 0.05 --seed 0 --save-every 50 \
    --resume --quiet
  echo "$*" > "$WORK/$1.args"
}
t train_lm base "$BASE_STEPS" 256 4 4
t train_lm base-small "$SMALL_STEPS" 192 3 4

declare -A NAME=([biomedical]=biomed [legal]=legal [finance]=finance)
for domain in biomedical legal finance; do
  name=${NAME[$domain]}
  t "$MEMDEC" memory build --base "$WORK/base" --corpus "$WORK/data/$domain.txt" --max-tokens "$MEM_TOKENS" \
    --valid "$DATA/$domain/valid.txt" --eval-max-tokens "$EVAL_TOKENS" \
    --out "$WORK/memories/$name" --work "$WORK/build/$name" --name "$name" --domain "$domain" \
    --description "demo memory: $domain text, for memdec's demo base" \
    --context 512 --index ivfpq --nlist 256 --code-size 32 --nprobe 16 --k "$K" --temperature "$TAU" \
    --arch llama --hidden-size 128 --layers 2 --heads 4 --max-len 512 \
    --seq-len 256 --train-batch-size 8 --max-steps "$MEM_STEPS" --lr 2e-3 \
    --seed 0 --save-every 50 --quiet
  # The same memory on the smaller base (plug-and-play); the manifest keeps the big base's α.
  t "$MEMDEC" memory eval --base "$WORK/base-small" --memory "$WORK/memories/$name" \
    --valid "$DATA/$domain/valid.txt" --eval-max-tokens "$EVAL_TOKENS" \
    --report-dir "$WORK/eval-small/$name" --no-update-manifest --quiet
done
# General-text perplexity of both bases (the "memory" slot holds base-small here).
t "$MEMDEC" memory eval --base "$WORK/base" --memory "$WORK/base-small" --valid "$DATA/general/valid.txt" \
  --eval-max-tokens "$EVAL_TOKENS" --report-dir "$WORK/eval-general" --no-update-manifest --quiet

t "$PY" "$REPO/demo/finalize.py" --work "$WORK" --dest "$DEST"
echo "[time] $(( $(date +%s) - START )) s: total" | tee -a "$TIMES"
}

main "$@"
