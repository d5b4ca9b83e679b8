#!/usr/bin/env bash
# Build pyfuse3 from its pinned source release with the afsfuse patches and
# install it into a venv (see README.md here).  Idempotent: does nothing when
# that venv already holds this exact build.
#   usage: patches/pyfuse3/build.sh VENV_DIR
set -euo pipefail

VERSION=3.5.0
LOCAL=afsfuse.2   # bump whenever a patch here changes
SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24

here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "${1:?usage: build.sh VENV_DIR}" && pwd)"
pip="$venv/bin/pip"
want="$VERSION+$LOCAL"

# What was built from: the patches, the build pins and this script.
key="$(cat "$here"/*.patch "$here/build-constraints.txt" "$0" | sha256sum | cut -d' ' -f1)"
marker="$venv/.pyfuse3-build-key"
have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)"
if [ "$have" = "$want" ] && [ "$(cat "$marker" 2>/dev/null)" = "$key" ]; then
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "pyfuse3: building $want (installed: ${have:-none})"
# The source release only (never a wheel): the patch applies to its files.
"$pip" download -q --no-binary :all: --no-deps "pyfuse3==$VERSION" -d "$work"
sdist="$work/pyfuse3-$VERSION.tar.gz"
echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
tar -xzf "$sdist" -C "$work"
src="$work/pyfuse3-$VERSION"
for p in "$here"/*.patch; do
    patch -s -p1 -d "$src" < "$p"
done
# The release ships C generated from the unpatched .pyx: make Cython
# regenerate it from the patched sources.
rm -f "$src/src/pyfuse3/__init__.c"
# setuptools_scm would call this an untagged 0.x: give it the version, with a
# local label so pip sees `pyfuse3>=3.4` satisfied and the build is detectable.
SETUPTOOLS_SCM_PRETEND_VERSION="$want" "$pip" wheel -q --no-deps \
    --build-constraint "$here/build-constraints.txt" -w "$work/dist" "$src"
"$pip" install -q --no-deps --force-reinstall "$work"/dist/pyfuse3-*.whl
# Checked by metadata, not import: trio arrives with the project install.
[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')" = "$want" ]
echo "$key" > "$marker"
echo "pyfuse3: installed $want"
