#!/usr/bin/env bash
# Record a py-spy profile of the gateway's gevent worker under the (e) load (non-streamed
# requests, 16 connections) and print the top frames by inclusive and self time.
#
#   bench/profile.sh              # 10 s
#   bench/profile.sh 30           # 30 s
#   bench/profile.sh 20 --rev HEAD~1 --profile-rate 500
#
# Raw collapsed stacks go to bench/results/<timestamp>-profile.txt (flamegraph.pl / inferno /
# speedscope read them). Needs py-spy (pip install -r bench/requirements.txt) and ptrace rights
# over the worker (root, or CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=0).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
[[ $# -gt 0 ]] && shift
exec .venv/bin/python bench/run.py --profile "$seconds" "$@"
