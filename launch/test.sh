#!/usr/bin/env bash
# Fresh machine -> the whole test suite (including the real-model parity tests marked slow).
# Extra arguments go to pytest, e.g. -m "not slow" for the fast tier only.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_env.sh
. "$(dirname "$0")/_env.sh" "[test]"
# Two workers by default (SFTJAX_TEST_WORKERS=0 runs in one process); the slowest tests are listed.
python -m pytest -q -n "${SFTJAX_TEST_WORKERS:-2}" --durations=15 "$@"
