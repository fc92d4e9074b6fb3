#!/usr/bin/env bash
# Build the demo's memories for its base (SmolLM2-135M-Instruct, the GGUF pinned in demo/base.json) from
# ../shared/data with the project's own toolkit (CPU, seeded).
#
#   make demo-models                      # or: demo/recipe.sh
#   MEMDEC_DEMO_WORK=/tmp/w demo/recipe.sh  # where the intermediate files go (outside the repo)
#
# Stages, per domain: a leave-one-source-out memory per held-out source (HOLD_OUT; datastore from the other
# source only, evaluated on the held-out source) → the domain's α from those held-out curves
# (`memdec memory alpha`) → that α checked on fresh text of the held-out source → the shipped memory from every
# source of the domain at that α → evaluations (other domains' text for specificity, general text for what the
# memory costs there) → routers (demo/routers.sh) → float16 copies, tables and plots into demo/ (finalize.py).
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
# were chosen, and what the leave-one-source-out builds with them score: docs/demo.md). The base's forward is the
# cost here (~300 tokens/s per core): a datastore of 200k tokens takes ~12 minutes on one core.
BASE=${BASE:-$("$PY" -m server.demo locate --demo "$REPO/demo")}
MEM_TOKENS=${MEM_TOKENS:-200000}    # datastore tokens per memory (its sources interleaved)
MEM_STEPS=${MEM_STEPS:-250}          # 8 × 256 tokens per step
MEM_HIDDEN=${MEM_HIDDEN:-256}        # the 49k-token embedding is most of a memory: 12.6M of its parameters at 256
MEM_LAYERS=${MEM_LAYERS:-2}
MEM_LR=${MEM_LR:-2e-3}
# The memory's embedding starts from the base's, projected onto its top MEM_HIDDEN singular directions (1), or
# random (0): docs/demo.md has the measurement that chose it.
MEM_INIT_EMBEDDINGS=${MEM_INIT_EMBEDDINGS:-1}
K=${K:-256}
TAU=${TAU:-16}
CONTEXT=${CONTEXT:-512}              # datastore windows: 512 tokens, each key with ≥ 128 tokens of context
STRIDE=${STRIDE:-384}
INDEX=${INDEX:-ivfpq}               # faiss index of the datastore keys (flat for tiny trial runs)
NLIST=${NLIST:-1024}                 # its IVF cells
CODE_SIZE=${CODE_SIZE:-64}           # PQ bytes per key (576 dims: 9 per sub-quantizer)
EVAL_TOKENS=${EVAL_TOKENS:-10000}    # held-out tokens scored per source
SPEC_TOKENS=${SPEC_TOKENS:-5000}     # tokens of each other domain for the specificity check
# A real base leaves a small memory less to fix than a toy one did: the best α sit low, so the grid does too.
ALPHAS=${ALPHAS:-0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6,0.7,0.8,0.9}
# Which sources get a leave-one-source-out memory: "shipped" (what the shipped α come from: each domain's
# larger source — MedQuAD, Supreme Court opinions, FOMC minutes) or "all" (both sources of every domain; ~25
# more minutes of CPU per fold). Only the shipped manifests' α and the numbers depend on it, never the weights.
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
init_args=(); [ "$MEM_INIT_EMBEDDINGS" = 1 ] && init_args=(--init-embeddings-from "$BASE")

declare -A NAME=([biomedical]=biomed [legal]=legal [finance]=finance)
declare -A SOURCES=([biomedical]="medquad pubmedqa" [legal]="scotus-opinions us-code"
                    [finance]="fomc-minutes sec-10k-risk-factors")
declare -A SHIPPED_FOLDS=([biomedical]="medquad" [legal]="scotus-opinions" [finance]="fomc-minutes")
build() {  # domain out name [extra flags]: one memory of the domain with the demo's settings
  local domain=$1 out=$2 name=$3; shift 3
  "$MEMDEC" memory build --base "$BASE" --corpus "$WORK/data/$domain/train" --sources files \
    --valid "$WORK/data/$domain/valid" --eval-max-tokens "$EVAL_TOKENS" --max-tokens "$MEM_TOKENS" \
    --out "$out" --work "$out.work" --name "$name" --domain "$domain" \
    --description "demo memory: $domain text, for SmolLM2-135M-Instruct" \
    --context "$CONTEXT" --stride "$STRIDE" --index "$INDEX" --nlist "$NLIST" --code-size "$CODE_SIZE" --nprobe 16 \
    --k "$K" --temperature "$TAU" --arch llama --hidden-size "$MEM_HIDDEN" --layers "$MEM_LAYERS" --heads 4 \
    --max-len 1024 "${init_args[@]}" --seq-len 256 --train-batch-size 8 --max-steps "$MEM_STEPS" --lr "$MEM_LR" \
    --alphas "$ALPHAS" --seed 0 --save-every 50 --quiet "$@"
}
domain_memories() {  # domain: its leave-one-source-out memories, its α (checked on fresh text), the shipped memory
  local domain=$1 name=${NAME[$1]} reports=() held alpha src
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
    t "$MEMDEC" memory eval --base "$BASE" --memory "$WORK/loso/$domain/without-$src" \
      --cross-source "$src=$WORK/data/$domain/train/$src.txt" --alpha "$alpha" --eval-max-tokens "$EVAL_TOKENS" \
      --alphas "$ALPHAS" --report-dir "$WORK/eval-alpha-check/$domain-$src" --no-update-manifest --quiet
  done
  t build "$domain" "$WORK/memories/$name" "$name" --alpha "$alpha"
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
# Specificity: each memory at its α on the other domains' text (the first tokens of each valid.txt), and on
# general text (what mixing it in costs where it has nothing to add).
for domain in biomedical legal finance; do
  name=${NAME[$domain]}; others=()
  for other in biomedical legal finance general; do
    [ "$other" = "$domain" ] || others+=(--cross-source "$other=$DATA/$other/valid.txt")
  done
  t "$MEMDEC" memory eval --base "$BASE" --memory "$WORK/memories/$name" "${others[@]}" \
    --alpha "$(cat "$WORK/alpha-$domain.txt")" --alphas "$ALPHAS" \
    --eval-max-tokens "$SPEC_TOKENS" --report-dir "$WORK/eval-specificity/$name" --no-update-manifest --quiet
done

# Routers ("alpha": "auto"), fitted on held-out sources: demo/routers.sh (also runnable on its own).
t env MEMDEC_DEMO_WORK="$WORK" MEMDEC_DATA="$DATA" MEMDEC="$MEMDEC" BASE="$BASE" "$REPO/demo/routers.sh"

t "$PY" "$REPO/demo/finalize.py" --work "$WORK" --dest "$DEST"
echo "[time] $(( $(date +%s) - START )) s: total" | tee -a "$TIMES"
}

main "$@"; exit  # on one line: bash never reads past it, even if this file changed mid-run
