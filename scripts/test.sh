#!/usr/bin/env bash
# Set up (if needed), check the house (lint, layering), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check archc tests benchmarks examples scripts
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
