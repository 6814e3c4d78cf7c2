#!/usr/bin/env bash
# Fresh machine -> SmolLM2-135M-Instruct fine-tuned with LoRA on TREC question types, on CPU.
# Prints held-out loss / exact match before and after, and sample replies before and after.
# Extra arguments go to `sftjax train`, e.g. --config.train.steps=20.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
WORKDIR=${WORKDIR:-runs/quickstart}
sftjax train --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
sftjax generate --workdir="$WORKDIR" --max-new-tokens=8 \
  --prompt="What is the population of Canada?" --prompt="Who invented the telephone?"
echo "results: $WORKDIR/results.json   tensorboard: tensorboard --logdir $WORKDIR/tb"
