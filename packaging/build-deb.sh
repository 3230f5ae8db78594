#!/bin/sh
# Build dist/zddd_<version>_all.deb and dist/zddctl_<version>_all.deb from the working tree with
# dpkg-buildpackage (debhelper, dh-python, pybuild), then check them with lintian (errors fail
# the build; warnings are shown).
# Installs its build dependencies with apt-get when one is missing. Run from the top of the tree
# (make deb).
#
# ZDDD_DEB_VERSION=V builds the tree as version V (zddd/__init__.py and a changelog entry are
# rewritten in the build copy, not in the tree): the upgrade test builds <version>+test1 and
# <version>+test2 of one tree this way.
set -eu
# Debian's tools and Debian's python3 only: a python3 earlier on PATH (pyenv, a venv) lacks
# the Debian modules pybuild uses.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV

build_deps="dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian"

missing=
for p in $build_deps; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' zddd/__init__.py)
changelog=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$version" != "$changelog" ]; then
    echo "build-deb: zddd/__init__.py says $version but packaging/debian/changelog says" \
         "$changelog; add a changelog entry (dch -v $version)" >&2
    exit 1
fi
for page in packaging/man/*.[0-9]; do
    grep -q "\"zddd $version\"" "$page" || {
        echo "build-deb: $page does not name zddd $version in its .TH line" >&2; exit 1; }
done
if ! ls bpf/*.c >/dev/null 2>&1 && [ ! -e bpf/README.md ]; then
    echo "build-deb: bpf/ has neither C source nor README.md to ship" >&2
    exit 1
fi

deb_version=${ZDDD_DEB_VERSION:-$version}

# A clean copy of what the package is built from: no venv, caches or build leftovers.
work=build/deb
src=$work/zddd-$deb_version
rm -rf "$work"
mkdir -p "$src"
cp -a zddd bpf systemd packaging pyproject.toml README.md examples "$src/"
[ -d docs ] && cp -a docs "$src/"
cp -a packaging/debian "$src/debian"
# The package's operator notes (install, drop-ins, what survives what) as Debian names them.
cp packaging/README.md "$src/debian/zddd.README.Debian"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
if [ "$deb_version" != "$version" ]; then
    sed -i "s/^__version__ = .*/__version__ = \"$deb_version\"/" "$src/zddd/__init__.py"
    { printf 'zddd (%s) bookworm; urgency=medium\n\n  * Built from the tree of %s as %s (ZDDD_DEB_VERSION).\n\n' \
          "$deb_version" "$version" "$deb_version"
      printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)" \
          "$(date -R)"
      cat packaging/debian/changelog; } > "$src/debian/changelog"
fi

(cd "$src" && dpkg-buildpackage -us -uc -b)

mkdir -p dist
debs="zddd_${deb_version}_all.deb zddctl_${deb_version}_all.deb"
for deb in $debs; do
    mv "$work/$deb" dist/
done
echo "lintian:"
(cd dist && lintian --fail-on error --info $debs)
for deb in $debs; do
    echo "built dist/$deb"
done
