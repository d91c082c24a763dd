#!/usr/bin/env bash
# Remove training records that leak benchmark questions (whole question, or >= 64 shared characters).
# With no arguments: the embedded sample's training records against its bench -> data/decontaminated/sample/.
# All flags: --help
source "$(dirname "$0")/env.sh"
exec python -m src.prepare.decontaminate "$@"
