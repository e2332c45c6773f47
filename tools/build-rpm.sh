#!/usr/bin/env bash
# Build the source RPM and the noarch binary RPM of xapi-storage-tasks from
# the working tree as it is (committed or not), then print their paths, one
# a line, on stdout (everything else goes to stderr).
#
#   tools/build-rpm.sh [extra rpmbuild arguments, e.g. --define 'plugin_name file']
#
# RPM_TOPDIR   rpmbuild's top directory (default: ./rpmbuild, git-ignored).
# The version is xapi_storage_tasks.__version__ from plugin/xapi_storage_tasks/__init__.py. The source
# tarball holds the tracked files plus the untracked files git does not
# ignore, as they are on disk now (git archive would miss uncommitted work).
set -euo pipefail

name=xapi-storage-tasks
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
die() { echo "build-rpm: $*" >&2; exit 1; }

command -v rpmbuild >/dev/null || die "rpmbuild not found (Debian/Ubuntu: apt-get install rpm; Fedora/EL: dnf install rpm-build)"
command -v git >/dev/null && git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$top is not a git working tree: the file list comes from git ls-files"

version=$(sed -n 's/^__version__[[:space:]]*=[[:space:]]*["'\'']\([^"'\'']*\)["'\''][[:space:]]*$/\1/p' plugin/xapi_storage_tasks/__init__.py)
[ -n "$version" ] || die "no __version__ = \"...\" line in plugin/xapi_storage_tasks/__init__.py"
case $version in
    *[!A-Za-z0-9._+~^]*) die "version '$version' is not a valid RPM version (no '-' or spaces)" ;;
esac

topdir=${RPM_TOPDIR:-$top/rpmbuild}
mkdir -p "$topdir" && topdir=$(cd "$topdir" && pwd)
mkdir -p "$topdir"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

# Source tarball: name-version/ + every tracked or untracked-but-not-ignored
# file that exists (a tracked file deleted in the tree is left out).
# Symlinks stay symlinks; the S flag keeps their targets unprefixed.
tarball=$topdir/SOURCES/$name-$version.tar.gz
git ls-files -z -c -o --exclude-standard |
    while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done |
    LC_ALL=C sort -z |
    tar --null --no-recursion -T - --owner=0 --group=0 --numeric-owner \
        --transform "s,^,$name-$version/,S" -czf "$tarball"

# The spec, with the version pinned so the source RPM rebuilds on its own.
spec=$topdir/SPECS/$name.spec
{ printf '%%global pkg_version %s\n' "$version"; cat packaging/$name.spec; } > "$spec"

# On a host whose rpm database is not the system's package database
# (Debian, Ubuntu), BuildRequires cannot be checked: skip that check.
nodeps=()
if ! rpm -q --whatprovides python3 >/dev/null 2>&1; then
    echo "build-rpm: python3 is not in the rpm database (not an RPM-based host?): building with --nodeps" >&2
    nodeps=(--nodeps)
fi

log=$topdir/build-$name.log
if ! rpmbuild -ba ${nodeps[@]+"${nodeps[@]}"} --define "_topdir $topdir" "$@" "$spec" >"$log" 2>&1; then
    cat "$log" >&2
    die "rpmbuild failed (log: $log)"
fi
echo "build-rpm: built from $top (rpmbuild log: $log)" >&2
written=$(sed -n 's/^Wrote: //p' "$log")
[ -n "$written" ] || die "rpmbuild wrote no package (log: $log)"
printf '%s\n' "$written"
