#!/usr/bin/env bash
# The test command: installs what the API and browser tests need beyond cargo
# (schemathesis, chromium, playwright-core; fast when already there), then
# runs every test of the workspace against the local servers.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-tools.sh
cargo test --workspace "$@"
