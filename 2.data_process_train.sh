#!/usr/bin/env bash
# Step 2: priority-ordered, tokenized, packed training rows.
source "$(dirname "$0")/scripts/env.sh"
echo "2.data_process_train.sh: not implemented yet (issue 4)" >&2
exit 2
