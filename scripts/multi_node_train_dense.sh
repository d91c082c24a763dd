#!/usr/bin/env bash
# Step 3 across nodes (accelerate multi-machine launch + DeepSpeed). Run the same command on every node, each with its
# own --machine-rank; all nodes must reach --main-ip:--main-port (the rank-0 node). Every other flag goes to
# src.train.train (see docs/train.md), e.g. 2 nodes x 8 GPUs:
#   node 0: bash scripts/multi_node_train_dense.sh --machine-rank 0 --main-ip 10.0.0.1 --nodes 2 --gpus-per-node 8 \
#             --model models/Qwen2-7B --train data/exp/train --dev data/exp/dev.jsonl --out ckpts/exp --zero 3
#   node 1: the same with --machine-rank 1
# --out should be on a filesystem shared by the nodes (then rank 0 alone renames and rotates checkpoints); on
# node-local disks each node keeps its own copy and node 0's holds the HF weights.
set -euo pipefail
source "$(dirname "$0")/env.sh"
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
MACHINE_RANK="" MAIN_IP="" MAIN_PORT=29500 NODES="" GPUS=""
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --machine-rank) MACHINE_RANK="$2"; shift 2 ;;
    --main-ip) MAIN_IP="$2"; shift 2 ;;
    --main-port) MAIN_PORT="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$MACHINE_RANK" ] || [ -z "$MAIN_IP" ] || [ -z "$NODES" ] || [ -z "$GPUS" ]; then
  echo "multi_node_train: --machine-rank, --main-ip, --nodes and --gpus-per-node are required" >&2
  usage
fi
exec python -m src.train.launch --config_file src/train/configs/multi_node.yaml \
  --num_machines "$NODES" --num_processes "$((NODES * GPUS))" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
  --deepspeed_multinode_launcher standard --same_network --rdzv_backend static \
  -m src.train.train --expect "${TRAIN_EXPECT:-dense}" "${TRAIN_ARGS[@]}"
