#!/usr/bin/env bash
# Step 3: training with accelerate + DeepSpeed.
source "$(dirname "$0")/scripts/env.sh"
echo "3.single_node_train.sh: not implemented yet (issue 5)" >&2
exit 2
