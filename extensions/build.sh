#!/usr/bin/env bash
# Build extensions/crsqlite.so from the registry source of @vlcn.io/crsqlite.
#
# No registry ships a Linux binary of cr-sqlite, and crates.io is out of reach,
# so we take the npm tarball (C sources + Rust crates), check its sha256, apply
# the patches beside this script, build the Rust part offline against Debian's
# packaged crates, and link the C part with gcc.  See DESIGN.md section 3.
#
# The build is skipped when crsqlite.so exists and its stamp matches the
# inputs (version, tarball hash, patches, this script): a second run with
# nothing changed does nothing.  FORCE=1 rebuilds anyway.
set -euo pipefail

VERSION=0.16.3
SHA256=e16e462763ebe38c30a466e53b979dc2464de1e2ebc0e2255c04266ca232a012
DEBIAN_PACKAGES="librust-bytes-dev librust-num-traits-dev librust-num-derive-dev librust-bindgen-dev libclang-dev"

here=$(cd "$(dirname "$0")" && pwd)
out="$here/crsqlite.so"
stamp="$here/crsqlite.so.stamp"
work="$here/.build"

inputs_hash() {
    { echo "$VERSION $SHA256"; cat "$here/build.sh" "$here"/patches/*.patch; } | sha256sum | cut -d' ' -f1
}

want=$(inputs_hash)
if [[ -z "${FORCE:-}" && -f "$out" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "extensions/crsqlite.so is up to date"
    exit 0
fi

need_debian_packages() {
    local missing=()
    for pkg in $DEBIAN_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

fetch_source() {
    rm -rf "$work"
    mkdir -p "$work"
    (cd "$work" && npm pack --silent "@vlcn.io/crsqlite@$VERSION" >/dev/null)
    local tarball="$work/vlcn.io-crsqlite-$VERSION.tgz"
    local got
    got=$(sha256sum "$tarball" | cut -d' ' -f1)
    if [[ "$got" != "$SHA256" ]]; then
        echo "error: @vlcn.io/crsqlite@$VERSION tarball has sha256 $got, expected $SHA256" >&2
        exit 1
    fi
    tar xzf "$tarball" -C "$work"
    # They pin a 2023 nightly toolchain and crates.io versions we cannot fetch.
    find "$work/package" \( -name rust-toolchain.toml -o -name Cargo.lock \) -delete
    for patch in "$here"/patches/*.patch; do
        patch -s -p1 -d "$work/package" < "$patch"
    done
}

build_rust() {
    mkdir -p "$work/cargo-home"
    cat > "$work/cargo-home/config.toml" <<'EOF'
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "/usr/share/cargo/registry"

[net]
offline = true
EOF
    (cd "$work/package/rs/bundle_static" &&
        CARGO_HOME="$work/cargo-home" RUSTC_BOOTSTRAP=1 RUSTFLAGS="--cap-lints=allow" CRSQLITE_COMMIT_SHA="v$VERSION" \
        cargo build --quiet --release --features loadable_extension)
}

link_extension() {
    local src="$work/package/src"
    gcc -std=c99 -O2 -fPIC -shared -Wall -Wno-unused -I"$src" \
        "$src/crsqlite.c" "$src/changes-vtab.c" "$src/ext-data.c" \
        "$work/package/rs/bundle_static/target/release/libcrsql_bundle_static.a" \
        -o "$work/crsqlite.so" -lm -lpthread -ldl
    mv "$work/crsqlite.so" "$out"
}

need_debian_packages
echo "building cr-sqlite $VERSION (about a minute)"
fetch_source
build_rust
link_extension
echo "$want" > "$stamp"
rm -rf "$work"
echo "built $out"
