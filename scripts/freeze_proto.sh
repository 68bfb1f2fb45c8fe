#!/usr/bin/env bash
# Freezes the protocol: builds the buf image fleet/proto/flotilla_v1.binpb from fleet/proto, the
# baseline that `buf breaking` (tests/test_proto_v1.py) compares the .proto against.
#
# Run it after an allowed change to the .proto (a new field or message, a reserved number) and commit
# the image with the change. Never run it to make a breaking change pass: that unfreezes v1.
# buf comes from package.json (scripts/setup.sh installs it with npm).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  echo "freeze_proto: $BUF is missing: run scripts/setup.sh (or npm ci) first" >&2
  exit 1
fi
"$BUF" lint fleet/proto
# Without source info (comments, line numbers): the image changes only when the schema does.
"$BUF" build fleet/proto --exclude-source-info -o fleet/proto/flotilla_v1.binpb
echo "freeze_proto: wrote fleet/proto/flotilla_v1.binpb ($("$BUF" --version), $(wc -c <fleet/proto/flotilla_v1.binpb) bytes)"
