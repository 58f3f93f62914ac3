#!/usr/bin/env bash
# Lint and import order (ruff, line length 100), as CI runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/ruff check .
