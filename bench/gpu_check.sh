#!/usr/bin/env bash
# The one GPU check: every GPU figure the docs quote comes from this script. On one GPU machine, offline, with the
# project's requirements (plus requirements-gpu.txt when it is installed), in under 6 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh                       # every part
#   PARTS="eval train" bash bench/gpu_check.sh    # some parts (env pipeline eval train moe)
#   DATA=DIR bash bench/gpu_check.sh              # real bench items for the eval part (bench_test.json and
#                                                 # bench_dev.json; default: .gpu/xmb when present, else the sample)
#
# Every part runs under its own time limit (together 6 minutes) and every figure is printed as one JSON line the moment
# it is measured,
# also appended to $RESULTS (results/gpu_check.jsonl; and to $OUT/gpu_check.jsonl when OUT is set), so a run cut short
# still reports what it measured. A part that fails or passes its limit is reported as such ({"part", "rc",
# "timed_out"}) and the next one runs.
#   env       the GPU, torch, transformers, whether Liger is installed
#   pipeline  bash run_pipeline.sh as shipped; then step 4's run.json: items/s, forward calls, ms per call
#   eval      bench/eval_speed.py on real 3-shot items: floor, reference-b4, hf-b64, custom (profiled), cb; the
#             Post-MoE model (custom, cb on its stock export); the 140 sample items (custom): item counts scaled to
#             each method's time budget; ratios against the reference-style loop and identical-letter shares
#   train     bench/train_speed.py, Qwen2-0.5B shape, 4,096-token packed rows: sdpa, varlen, varlen+liger, compile,
#             moe (7 experts, last 2 layers): tokens/s, MFU, peak memory, 20 steps' losses compared across paths
#   moe       bash scripts/moe_pipeline.sh (upcycle, train, score, export, compare letters)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set +e  # env.sh sets -e; here a failed or timed-out part is reported and the next one runs
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PARTS="${PARTS:-env pipeline eval train moe}"
RESULTS="${RESULTS:-results/gpu_check.jsonl}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu runs the same plumbing on a CPU (tiny sizes: a check of this script only)
mkdir -p "$(dirname "$RESULTS")"
if [ -z "${DATA:-}" ]; then
  if [ -f .gpu/xmb/bench_test.json ]; then DATA=.gpu/xmb; else DATA=""; fi
fi
T0=$(date +%s)

emit() {  # emit '{"json": ...}': print the line, append it to the results file(s)
  echo "$1"
  echo "$1" >> "$RESULTS"
  if [ -n "${OUT:-}" ]; then echo "$1" >> "$OUT/gpu_check.jsonl"; fi
}

part() {  # part NAME LIMIT_SECONDS COMMAND...: run it under its limit (SIGTERM, then SIGKILL 20 s later), report it
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout -k 20 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - start ))
  local cut=false; if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then cut=true; fi
  emit "{\"gpu_check\": \"part\", \"part\": \"$name\", \"rc\": $rc, \"timed_out\": $cut, \"seconds\": $took, \"limit\": $limit, \"elapsed\": $(( $(date +%s) - T0 ))}"
  # the benchmarks' own per-method lines come back too (a device machine returns what is under $OUT)
  if [ -n "${OUT:-}" ]; then cp "$(dirname "$RESULTS")"/gpu_check_*.jsonl "$OUT"/ 2>/dev/null || true; fi
}

wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --------------------------------------------------------------------------------------------------------- env
if wants env; then
  emit "$(python - <<'PY'
import importlib.util, json, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
mem = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None
print(json.dumps({"gpu_check": "env", "gpu": gpu, "memory_gib": mem, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "transformers": transformers.__version__,
                  "liger": importlib.util.find_spec("liger_kernel") is not None,
                  "flash_attn": importlib.util.find_spec("flash_attn") is not None,
                  "varlen_attn": importlib.util.find_spec("torch.nn.attention.varlen") is not None}))
PY
)"
fi

# ---------------------------------------------------------------------------------------------------- pipeline
step4_figures() {  # step4_figures RESULT_DIR LABEL: step 4's own counters from its run.json, as one line
  python - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
run_file = Path(sys.argv[1]) / "run.json"
if not run_file.is_file():
    print(json.dumps({"gpu_check": sys.argv[2], "status": "no run.json"}))
    raise SystemExit
run = json.loads(run_file.read_text())
eng = run.get("engine") or {}
calls, secs = eng.get("forward_calls") or 0, run.get("engine_seconds") or 0
print(json.dumps({"gpu_check": sys.argv[2], "status": run.get("status"), "engine": run["settings"].get("engine"),
                  "items": run.get("items"), "items_per_second": run.get("items_per_second"),
                  "engine_seconds": secs, "forward_calls": calls,
                  "ms_per_forward_call": round(1000 * secs / calls, 2) if calls else None,
                  "prompt_tokens": eng.get("prompt_tokens"), "new_tokens": eng.get("new_tokens"),
                  "decode_steps": eng.get("decode_steps"), "device": run.get("device")}))
PY
}

if wants pipeline; then
  part pipeline 80 bash run_pipeline.sh
  emit "$(step4_figures results/sample_SmolLM2-135M-Instruct pipeline_step4)"
fi

# -------------------------------------------------------------------------------------------------------- eval
if wants eval; then
  EVAL_JSONL="$(dirname "$RESULTS")/gpu_check_eval.jsonl"
  rm -f "$EVAL_JSONL" "$EVAL_JSONL".letters.*
  SRC=(--sample); [ -n "$DATA" ] && SRC=(--data "$DATA")
  SIZE=(--items 2000 --max-prompt-tokens 2048); [ "$DEVICE" = cpu ] && SIZE=(--items 4 --max-prompt-tokens 600)
  EV=(python bench/eval_speed.py --device "$DEVICE" --threads 0 "${SRC[@]}" "${SIZE[@]}" --jsonl "$EVAL_JSONL")
  budget() { [ "$DEVICE" = cpu ] && echo "--items 4" || echo "--budget-seconds $1"; }
  # one process for the dense methods (its start-up paid once), the reference-style loop first (the others' ratios and
  # identical-letter shares are against it) and continuous batching last; each method sized to its own budget
  part eval_dense 75 "${EV[@]}" --methods reference-b4 floor hf-b64 custom cb $(budget 8) \
    --profile "$(dirname "$RESULTS")/gpu_check_profile"
  part eval_post_moe 40 "${EV[@]}" --methods custom cb --post-moe $(budget 6)
  SAMPLE_SIZE=(); [ "$DEVICE" = cpu ] && SAMPLE_SIZE=(--items 4)
  part eval_sample 25 python bench/eval_speed.py --device "$DEVICE" --threads 0 --sample --methods custom \
    "${SAMPLE_SIZE[@]}" --jsonl "$(dirname "$RESULTS")/gpu_check_sample.jsonl"
  [ -f "$EVAL_JSONL" ] && while IFS= read -r l; do emit "{\"gpu_check\": \"eval\", \"line\": $l}"; done < "$EVAL_JSONL"
fi

# ------------------------------------------------------------------------------------------------------- train
if wants train; then
  TRAIN_JSONL="$(dirname "$RESULTS")/gpu_check_train.jsonl"
  rm -f "$TRAIN_JSONL"
  if [ "$DEVICE" = cpu ]; then
    TR=(python bench/train_speed.py --layers 2 --seq 256 --steps 2 --warmup 1 --threads 1)
  else
    TR=(python bench/train_speed.py --preset qwen2-0.5b --seq 4096 --batch-size 4 --grad-accum 2 --threads 0)
  fi
  TR+=(--work-dir /tmp/gpu_check_train --jsonl "$TRAIN_JSONL")
  # 20 steps of each attention/loss path on the same rows (their losses are compared), then compile and Post-MoE
  part train 115 "${TR[@]}" --methods sdpa,varlen,varlen+liger,compile,moe --steps 20 --warmup 2 \
    --method-timeout 35
  [ -f "$TRAIN_JSONL" ] && while IFS= read -r l; do emit "{\"gpu_check\": \"train\", \"line\": $l}"; done < "$TRAIN_JSONL"
fi

# --------------------------------------------------------------------------------------------------------- moe
if wants moe; then
  part moe_pipeline 60 bash scripts/moe_pipeline.sh
  emit "$(step4_figures results/sample_SmolLM2-135M-Instruct_moe moe_step4)"
fi
emit "{\"gpu_check\": \"done\", \"parts\": \"$PARTS\", \"seconds\": $(( $(date +%s) - T0 ))}"
