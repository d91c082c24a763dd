#!/usr/bin/env bash
# Step 3 across nodes for a Post-MoE checkpoint (scripts/upcycle_moe.sh makes one): the same launch as
# multi_node_train_dense.sh (same arguments, one command per node), checking that --model is an MoE checkpoint.
# The learning rate defaults to the paper's MoE value (1e-4); under --zero 3 the sparse blocks are ZeRO-3 leaf modules.
#   node 0: bash scripts/multi_node_train_moe.sh --machine-rank 0 --main-ip 10.0.0.1 --nodes 2 --gpus-per-node 8 \
#             --model models/Qwen2-7B-MoE --train data/exp/train --dev data/exp/dev.jsonl --out ckpts/exp-moe --zero 3
#   node 1: the same with --machine-rank 1
TRAIN_EXPECT=moe exec bash "$(dirname "$0")/multi_node_train_dense.sh" "$@"
