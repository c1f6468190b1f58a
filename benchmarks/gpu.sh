#!/usr/bin/env bash
# preftune vs TRL on one GPU machine without package access, in one command (see usage below).
set -u -o pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu.sh [--wheels DIR] [--out DIR] [--quick] [--dry-run] [--help]

preftune vs TRL on one CUDA GPU, offline, within about 8 minutes:
  1. installs the wheels in DIR (pip install --no-index --find-links DIR, into a private --target folder put
     on PYTHONPATH; nothing is fetched), then checks that torch sees a GPU and that trl, datasets, transformers
     and preftune (from this checkout) import;
  2. DPO (benchmarks/vs_trl.py), bf16 autocast, SDPA, preftune's packed layout, TRL with padding_free=True
     (TRL 1.16 turns it off again with a warning; the JSON records what ran): SmolLM2-135M's shape with every
     row (TRL precompute on / off / gradient checkpointing; preftune plain / compile cold and warm cache /
     gradient checkpointing / bf16 weights), then Qwen2.5-0.5B's shape (a random LlamaConfig model) with the
     same rows but compile; 20 optimizer steps each, steady-state samples/s over steps 2..20 beside end to end;
  3. GRPO (benchmarks/grpo_vs_trl.py) on the 135M shape, bf16, 4 steps;
  4. if flash_attn imports and time is left: the 135M shape again with attn_implementation flash_attention_2
     (preftune with engine.layout: padded, which that kernel needs), TRL precompute off and preftune only.
Each stage runs under what is left of the 8-minute budget (one that would start with under 30 s left is
skipped and noted). Results: DIR/gpu_results.md (the tables, one per stage, each with its command and the
machine: CPU model and bf16 flags, GPU), the JSON of each stage and gpu.log.

options:
  --wheels DIR   a folder of .whl files for what the machine lacks (on the project's H200 image: trl,
                 datasets and its needs, e.g. dill, multiprocess; build it where pip works with
                 `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
                 manylinux2014_x86_64 -d DIR NAME==VERSION`); without it nothing is installed
  --out DIR      where the results go (default: $OUT when set, else ./gpu_bench_out)
  --quick        fewer rows (TRL precompute off, preftune) and steps (5; DPO), GRPO 2 steps: a smoke run
  --dry-run      print the planned commands and run nothing
  --help         this text
environment: PYTHON (default python3), WORKDIR (models and runs; default /tmp/preftune_gpu_bench)
EOF
}

die() { echo "gpu.sh: $*" >&2; exit 2; }

WHEELS="" OUTDIR="${OUT:-}" QUICK=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || die "--wheels needs a folder of .whl files"; WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; [ -n "$WHEELS" ] || die "--wheels needs a folder of .whl files"; shift ;;
    --out) [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || die "--out needs a folder"; OUTDIR="$2"; shift 2 ;;
    --out=*) OUTDIR="${1#*=}"; [ -n "$OUTDIR" ] || die "--out needs a folder"; shift ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (options: --wheels DIR, --out DIR, --quick, --dry-run, --help)" ;;
  esac
done
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such folder"
  compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels $WHEELS: no .whl files in it"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${OUTDIR:-$PWD/gpu_bench_out}"
WORK="${WORKDIR:-/tmp/preftune_gpu_bench}"
SITE="$WORK/site"
MD="$OUTDIR/gpu_results.md"
BUDGET=480
START=$(date +%s)

if [ "$QUICK" = 1 ]; then
  ROWS="trl-off,preftune" ROWS_05B="trl-off,preftune" STEPS=5 GRPO_STEPS=2
else
  ROWS="trl-on,trl-off,trl-gc,preftune,preftune-compile,preftune-compile-warm,preftune-gc,preftune-bf16w"
  ROWS_05B="trl-on,trl-off,trl-gc,preftune,preftune-gc,preftune-bf16w"  # compile: the 135M stage shows it
  STEPS=20 GRPO_STEPS=4
fi
DPO=("$PY" "$REPO/benchmarks/vs_trl.py" --precision bf16 --device cuda --trl-padding-free --steps "$STEPS"
     --threads 4 --workdir "$WORK" --md "$MD")

# show COMMAND...: the command as one line, an argument with spaces or quotes in single quotes
show() {
  local out="+" x
  for x in "$@"; do
    case "$x" in *[[:space:]\'\"\$]*) out+=" '${x//\'/\'\\\'\'}'" ;; *) out+=" $x" ;; esac
  done
  printf '%s\n' "$out"
}

# stage NAME COMMAND...: run COMMAND under the time left, log it; a failure or timeout is noted, not fatal.
stage() {
  local name="$1"; shift
  if [ "$DRY" = 1 ]; then show "$@"; return 0; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 30 ]; then
    echo "- $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$MD"; return 0
  fi
  echo "== $name (${left}s left)"; show "$@"
  timeout "$left" "$@" 2>&1 | tee -a "$OUTDIR/gpu.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "- $name: exit $rc$([ "$rc" = 124 ] && echo ' (out of time)')" | tee -a "$MD"
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUTDIR" "$WORK" || die "cannot create $OUTDIR or $WORK"
  : > "$MD"; : > "$OUTDIR/gpu.log"
fi
if [ -n "$WHEELS" ]; then
  INSTALL=("$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir
           --upgrade --target "$SITE" "$WHEELS"/*.whl)
  if [ "$DRY" = 1 ]; then show "${INSTALL[@]}"; else "${INSTALL[@]}" || die "installing the wheels in $WHEELS failed"; fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
PRE=("$PY" -c 'import sys, torch, transformers, trl, datasets, preftune
if not torch.cuda.is_available(): sys.exit("gpu.sh: torch sees no CUDA GPU")
print(f"# preftune vs TRL on {torch.cuda.get_device_name(0)}\n\ntorch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, trl {trl.__version__}, datasets {datasets.__version__}")')
if [ "$DRY" = 1 ]; then show "${PRE[@]}"; else "${PRE[@]}" >> "$MD" || die "preflight failed (see the line above)"; fi

stage "DPO, SmolLM2-135M shape" "${DPO[@]}" --attn sdpa --model smol135m --rows "$ROWS" --out "$OUTDIR/dpo_smol135m.json"
stage "DPO, Qwen2.5-0.5B shape" "${DPO[@]}" --attn sdpa --model qwen05b --rows "$ROWS_05B" --out "$OUTDIR/dpo_qwen05b.json"
stage "GRPO, SmolLM2-135M shape" "$PY" "$REPO/benchmarks/grpo_vs_trl.py" --model smol135m --precision bf16 \
  --device cuda --steps "$GRPO_STEPS" --threads 4 --workdir "$WORK" --out "$OUTDIR/grpo.json" --md "$MD"
FLASH=("${DPO[@]}" --attn flash_attention_2 --preftune-engine layout=padded --model smol135m --rows trl-off,preftune --out "$OUTDIR/dpo_flash.json")
if [ "$DRY" = 1 ]; then
  echo "# only if flash_attn imports (and not --quick):"; show "${FLASH[@]}"
elif [ "$QUICK" = 0 ] && "$PY" -c 'import flash_attn' 2>/dev/null; then
  stage "DPO, 135M shape, flash_attention_2" "${FLASH[@]}"
else
  echo "- flash_attention_2: not run ($([ "$QUICK" = 1 ] && echo '--quick' || echo 'flash_attn does not import'))" >> "$MD"
fi
[ "$DRY" = 1 ] || echo "results: $MD ($(( $(date +%s) - START ))s)"
