#!/usr/bin/env bash
# Fresh machine -> SmolLM2-135M-Instruct fine-tuned with LoRA on TREC question types, on CPU.
# Prints held-out loss / exact match before and after, and sample replies before and after.
# Extra arguments go to `sftjax train`, e.g. --config.train.steps=20.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_env.sh
. "$(dirname "$0")/_env.sh"
WORKDIR=${WORKDIR:-runs/quickstart}
sftjax train --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
# Replies to new questions with the task's system prompt, from the saved checkpoint.
SYSTEM=$(python -c 'from sftjax.data.recipes import TREC_SYSTEM; print(TREC_SYSTEM)')
sftjax generate --workdir="$WORKDIR" --max-new-tokens=8 --system="$SYSTEM" \
  --prompt="How many people live in Canada?" --prompt="Who invented the telephone?" \
  --prompt="Where is the Eiffel Tower?" --prompt="What does NASA stand for?"
echo "results: $WORKDIR/results.json   tensorboard: tensorboard --logdir $WORKDIR/tb"
