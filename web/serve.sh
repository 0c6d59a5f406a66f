#!/usr/bin/env bash
# Serves the page built by web/build.sh at http://127.0.0.1:PORT/ (default 8000). WebGPU
# needs a secure context: localhost is one, a LAN address over plain HTTP is not.
set -euo pipefail
cd "$(dirname "$0")"
port="${1:-8000}"
if [ ! -f pkg/diffwgpu_web.js ]; then
    echo "web/pkg/ is missing; build the page first with web/build.sh" >&2
    exit 1
fi
if ! command -v python3 >/dev/null; then
    echo "python3 not found: serve web/ with any static file server on localhost instead" >&2
    exit 1
fi
echo "serving http://127.0.0.1:$port/ (Ctrl-C stops)" >&2
exec python3 -m http.server "$port" --bind 127.0.0.1
