#!/usr/bin/env bash
# Rebuild the demo models in demo/ from ../shared/data with the project's own toolkit (CPU, seeded).
#
#   make demo-models                      # or: demo/recipe.sh
#   MEMDEC_DEMO_WORK=/tmp/w demo/recipe.sh  # where the intermediate files go (outside the repo)
#
# Stages: tokenizer (general text) → base and base-small (general + 1/10 of each domain) →
# per domain: a leave-one-source-out memory per held-out source (HOLD_OUT; datastore from the other
# source only, evaluated on the held-out source) → the domain's α from those held-out curves
# (`memdec memory alpha`) → the shipped memory from every source of the domain at that α → evaluations
# (base-small, other domains' text for specificity) → float16 copies, tables and plots into demo/.
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

# Sizes and budgets (the tables in demo/results.md and docs/demo.md come from these defaults; how they
# were chosen, and what the leave-one-source-out builds with them score: docs/demo.md).
BASE_STEPS=${BASE_STEPS:-250}        # 8 × 256 tokens per step
SMALL_STEPS=${SMALL_STEPS:-200}
MEM_TOKENS=${MEM_TOKENS:-300000}     # datastore tokens per memory (its sources interleaved)
MEM_STEPS=${MEM_STEPS:-250}          # 8 × 256 tokens per step
# Finance is the hard pair (FOMC minutes vs 10-K risk factors share little): at 300k tokens and 250 steps its
# FOMC fold gained only 7% on the source it never saw, with 1M and 400 steps 33% (docs/demo.md). It gets the
# larger budget; the other domains meet their targets with the smaller one.
FINANCE_TOKENS=${FINANCE_TOKENS:-1000000}
FINANCE_STEPS=${FINANCE_STEPS:-400}
K=${K:-256}
TAU=${TAU:-1.0}
INDEX=${INDEX:-ivfpq}               # faiss index of the datastore keys (flat for tiny trial runs)
NLIST=${NLIST:-1024}                 # its IVF cells
EVAL_TOKENS=${EVAL_TOKENS:-10000}    # held-out tokens scored per source
SPEC_TOKENS=${SPEC_TOKENS:-5000}     # tokens of each other domain for the specificity check
# Which sources get a leave-one-source-out memory: "shipped" (what the shipped α come from: each domain's
# larger source — MedQuAD, Supreme Court opinions, FOMC minutes — and, for finance, the 10-K risk factors
# too) or "all" (both sources of every domain; ~30 more minutes of CPU per fold). Only the shipped
# manifests' α and the numbers depend on it, never the shipped weights.
HOLD_OUT=${HOLD_OUT:-shipped}

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
# Everything after this uses the bases as they are shipped and served: float16 weights (what demo/ holds),
# so a memory's keys come from the very base it is mixed with.
for b in base base-small; do
  [ "$WORK/$b-f16/model.safetensors" -nt "$WORK/$b/model.safetensors" ] || t "$PY" "$REPO/demo/finalize.py" --half "$WORK/$b" "$WORK/$b-f16"
done

declare -A NAME=([biomedical]=biomed [legal]=legal [finance]=finance)
declare -A SOURCES=([biomedical]="medquad pubmedqa" [legal]="scotus-opinions us-code"
                    [finance]="fomc-minutes sec-10k-risk-factors")
declare -A SHIPPED_FOLDS=([biomedical]="medquad" [legal]="scotus-opinions"
                          [finance]="fomc-minutes sec-10k-risk-factors")
declare -A TOKENS=([biomedical]=$MEM_TOKENS [legal]=$MEM_TOKENS [finance]=$FINANCE_TOKENS)
declare -A STEPS=([biomedical]=$MEM_STEPS [legal]=$MEM_STEPS [finance]=$FINANCE_STEPS)
build() {  # domain out name [extra flags]: one memory of the domain with the demo's settings
  local domain=$1 out=$2 name=$3; shift 3
  "$MEMDEC" memory build --base "$WORK/base-f16" --corpus "$WORK/data/$domain/train" --sources files \
    --valid "$WORK/data/$domain/valid" --eval-max-tokens "$EVAL_TOKENS" --max-tokens "${TOKENS[$domain]}" \
    --out "$out" --work "$out.work" --name "$name" --domain "$domain" \
    --description "demo memory: $domain text, for memdec's demo base" \
    --context 512 --index "$INDEX" --nlist "$NLIST" --code-size 32 --nprobe 16 --k "$K" --temperature "$TAU" \
    --arch llama --hidden-size 128 --layers 2 --heads 4 --max-len 512 \
    --seq-len 256 --train-batch-size 8 --max-steps "${STEPS[$domain]}" --lr 2e-3 \
    --seed 0 --save-every 50 --quiet "$@"
}
domain_memories() {  # domain: its leave-one-source-out memories, its α, the shipped memory, base-small eval
  local domain=$1 name=${NAME[$1]} reports=() valid=() held alpha src
  case "$HOLD_OUT" in shipped) held=${SHIPPED_FOLDS[$domain]};; all) held=${SOURCES[$domain]};;
    *) echo "recipe: HOLD_OUT is shipped or all" >&2; return 2;; esac
  for src in $held; do  # leave-one-source-out: never sees $src, α chosen on $src
    t build "$domain" "$WORK/loso/$domain/without-$src" "$name-without-$src" --holdout-source "$src"
    reports+=("$WORK/loso/$domain/without-$src/evaluation.json")
  done
  alpha=$("$MEMDEC" memory alpha "${reports[@]}")
  echo "$alpha" > "$WORK/alpha-$domain.txt"
  echo "[memdec] $domain: α = $alpha from the held-out sources" | tee -a "$TIMES"
  # Does that α carry over to fresh text of the held-out source? Its train lines (never seen by that memory
  # either): α was chosen on its valid lines, so this is text that played no part in choosing it.
  for src in $held; do
    t "$MEMDEC" memory eval --base "$WORK/base-f16" --memory "$WORK/loso/$domain/without-$src" \
      --cross-source "$src=$WORK/data/$domain/train/$src.txt" --alpha "$alpha" --eval-max-tokens "$EVAL_TOKENS" \
      --report-dir "$WORK/eval-alpha-check/$domain-$src" --no-update-manifest --quiet
  done
  t build "$domain" "$WORK/memories/$name" "$name" --alpha "$alpha"
  # The same memory on the smaller base (plug-and-play), at the same α.
  for src in ${SOURCES[$domain]}; do valid+=(--valid "$WORK/data/$domain/valid/$src.txt"); done
  t "$MEMDEC" memory eval --base "$WORK/base-small-f16" --memory "$WORK/memories/$name" "${valid[@]}" \
    --alpha "$alpha" --eval-max-tokens "$EVAL_TOKENS" --report-dir "$WORK/eval-small/$name" --no-update-manifest --quiet
}
# The domains run side by side, one thread each (fixed, so results do not depend on the machine's cores);
# each one's output goes to $WORK/log-<domain>.txt.
pids=()
for domain in biomedical legal finance; do
  ( export OMP_NUM_THREADS=1; domain_memories "$domain" ) > "$WORK/log-$domain.txt" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "recipe: a domain failed; see $WORK/log-*.txt" >&2; exit 1; }
done
# Specificity: each memory at its α on the other domains' text (the first tokens of each valid.txt).
for domain in biomedical legal finance; do
  name=${NAME[$domain]}; others=()
  for other in biomedical legal finance; do
    [ "$other" = "$domain" ] || others+=(--cross-source "$other=$DATA/$other/valid.txt")
  done
  t "$MEMDEC" memory eval --base "$WORK/base-f16" --memory "$WORK/memories/$name" "${others[@]}" \
    --alpha "$(cat "$WORK/alpha-$domain.txt")" \
    --eval-max-tokens "$SPEC_TOKENS" --report-dir "$WORK/eval-specificity/$name" --no-update-manifest --quiet
done
# General-text perplexity of both bases (the "memory" slot holds base-small here).
t "$MEMDEC" memory eval --base "$WORK/base-f16" --memory "$WORK/base-small-f16" --valid "$DATA/general/valid.txt" \
  --eval-max-tokens "$EVAL_TOKENS" --report-dir "$WORK/eval-general" --no-update-manifest --quiet

# Routers ("alpha": "auto"), fitted on held-out sources: demo/routers.sh (also runnable on its own).
t env MEMDEC_DEMO_WORK="$WORK" MEMDEC_DATA="$DATA" MEMDEC="$MEMDEC" "$REPO/demo/routers.sh"

t "$PY" "$REPO/demo/finalize.py" --work "$WORK" --dest "$DEST"
echo "[time] $(( $(date +%s) - START )) s: total" | tee -a "$TIMES"
}

main "$@"; exit  # on one line: bash never reads past it, even if this file changed mid-run
