#!/usr/bin/env bash
# The demo's routers ("alpha": "auto"): the recipe's last stage before finalize, runnable on its own on a
# recipe work dir whose memories are built:
#
#   MEMDEC_DEMO_WORK=/path/to/work demo/routers.sh [domain ...]       # default: every domain
#   .venv/bin/python demo/finalize.py --work /path/to/work --dest demo --routers   # ship them only
#
# Per domain, for each leave-one-source-out memory the recipe built (never saw source S): fit its router on
# S's valid lines (text neither the memory nor, later, the evaluation saw), judge it on S's train lines (fresh
# documents of S) and on the other domains' and general valid text (sources neither the memory nor the router
# saw). The shipped memory saw every source of its domain, so no text of its domain is held out from it: it
# takes the router of its first fold (docs/demo.md says why) and is judged on the same other-domain texts.
# Routers read the context features (the toolkit's default; ROUTER_CONTEXT=0 fits 8-feature ones, --no-context).
# Cached: a router newer than its memory's weights (and, for a shipped one, than the fold's router) and of the
# kind asked for is kept, so an older 8-feature router is refitted.
set -euo pipefail

main() {
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${MEMDEC_DATA:-$(cd "$REPO/.." && pwd)/shared/data}
WORK=${MEMDEC_DEMO_WORK:-$(cd "$REPO/.." && pwd)/runs/demo-recipe}
MEMDEC=${MEMDEC:-$REPO/.venv/bin/memdec}
BASE=${BASE:-$("${PY:-$REPO/.venv/bin/python}" -m server.demo locate --demo "$REPO/demo")}  # the demo base (GGUF)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FIT_TOKENS=${FIT_TOKENS:-20000}       # fitting tokens (the held-out source's valid lines; the last 20% select)
ROUTER_EVAL_TOKENS=${ROUTER_EVAL_TOKENS:-5000}  # tokens of each evaluation text
ROUTER_CONTEXT=${ROUTER_CONTEXT:-1}
context_args=(); [ "$ROUTER_CONTEXT" = 1 ] || context_args=(--no-context)
declare -A NAME=([biomedical]=biomed [legal]=legal [finance]=finance)
declare -A SOURCES=([biomedical]="medquad pubmedqa" [legal]="scotus-opinions us-code"
                    [finance]="fomc-minutes sec-10k-risk-factors")
has_context() { grep -q advantage_ema "$1/router.json"; }
fresh() {
  [ -f "$1/router.safetensors" ] && [ "$1/router.safetensors" -nt "$1/model.safetensors" ] && [ "$1/router.safetensors" -nt "$2" ] &&
    { if [ "$ROUTER_CONTEXT" = 1 ]; then has_context "$1"; else ! has_context "$1"; fi; }
}
domains=("$@")
[ ${#domains[@]} -gt 0 ] || domains=(biomedical legal finance)
for domain in "${domains[@]}"; do
  [ -n "${NAME[$domain]:-}" ] || { echo "routers: unknown domain $domain" >&2; exit 2; }
  name=${NAME[$domain]} first=""
  others=()
  for o in biomedical legal finance general; do [ "$o" = "$domain" ] || others+=(--eval-text "$o=$DATA/$o/valid.txt"); done
  for src in ${SOURCES[$domain]}; do
    fold=$WORK/loso/$domain/without-$src
    [ -f "$fold/model.safetensors" ] || continue
    first=${first:-$fold}
    fresh "$fold" "$fold/model.safetensors" && { echo "[memdec] router $domain without $src: up to date"; continue; }
    "$MEMDEC" memory router --memory "$fold" --base "$BASE" --text "$src=$WORK/data/$domain/valid/$src.txt" \
      --max-tokens "$FIT_TOKENS" --eval-text "$src-train=$WORK/data/$domain/train/$src.txt" "${others[@]}" \
      --eval-max-tokens "$ROUTER_EVAL_TOKENS" --report-dir "$WORK/routers/$domain-without-$src" --quiet "${context_args[@]}"
  done
  [ -n "$first" ] || { echo "routers: $domain has no leave-one-source-out memory" >&2; exit 2; }
  shipped=$WORK/memories/$name
  fresh "$shipped" "$first/router.safetensors" && { echo "[memdec] router $name: up to date"; continue; }
  "$MEMDEC" memory router --memory "$shipped" --base "$BASE" --from "$first" \
    --eval-text "$domain-in-source=$DATA/$domain/valid.txt" "${others[@]}" --eval-max-tokens "$ROUTER_EVAL_TOKENS" \
    --report-dir "$WORK/routers/$name" --quiet
done
}

main "$@"; exit
