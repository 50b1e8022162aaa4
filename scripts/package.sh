#!/usr/bin/env bash
# `make package`: an installable archive of outbox for each supported
# PostgreSQL version, in target/package/. Each holds the library, the
# control file and SQL script, META.json, and install.sh, which copies them
# where the target server's pg_config says: no Rust needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/versions.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
out=target/package
mkdir -p "$out"
stage=$(mktemp -d /tmp/outbox-package.XXXXXX)
trap 'rm -rf "$stage"' EXIT

# `package.sh 18`: only those versions.
versions=("${@:-${PG_VERSIONS[@]}}")
for major in "${versions[@]}"; do
    pg_config=$(pg_config_of "$major")
    cargo pgrx package --pg-config "$pg_config" --out-dir "$stage/tree-$major"
    name=outbox-$version-pg$major-linux-$(uname -m)
    dir=$stage/$name
    mkdir -p "$dir/lib" "$dir/extension"
    cp "$stage/tree-$major$("$pg_config" --pkglibdir)/outbox.so" "$dir/lib/"
    cp "$stage/tree-$major$("$pg_config" --sharedir)/extension/"outbox* "$dir/extension/"
    cp META.json "$dir/"
    sed "s/@PG_MAJOR@/$major/; s/@VERSION@/$version/" scripts/package-install.sh >"$dir/install.sh"
    chmod +x "$dir/install.sh"
    tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
    echo "package: $out/$name.tar.gz"
done
