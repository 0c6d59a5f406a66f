#!/usr/bin/env bash
# Builds the page: the library for wasm32-unknown-unknown (release) and wasm-bindgen's
# JavaScript glue, into web/pkg/. Installs the wasm32 target and wasm-bindgen-cli at the
# version of the wasm-bindgen crate (they must match) when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $version" ]; then
    echo "installing wasm-bindgen-cli $version (the wasm-bindgen crate's version)" >&2
    cargo install wasm-bindgen-cli --version "$version"
fi

cargo build --release --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir pkg \
    target/wasm32-unknown-unknown/release/diffwgpu_web.wasm
echo "built web/pkg/; serve the page with web/serve.sh" >&2
