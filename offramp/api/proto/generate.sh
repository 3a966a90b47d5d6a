#!/usr/bin/env bash
# Regenerate offramp_pb2.py / offramp_pb2_grpc.py from offramp.proto (committed output).
# Run from anywhere with the project's venv active: offramp/api/proto/generate.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. offramp/api/proto/offramp.proto
