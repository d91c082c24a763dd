#!/usr/bin/env bash
# Step 4: XMedBench scoring.
source "$(dirname "$0")/scripts/env.sh"
echo "4.eval.sh: not implemented yet (issue 3)" >&2
exit 2
