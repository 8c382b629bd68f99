#!/usr/bin/env bash
# Build h2spec (github.com/summerwind/h2spec) offline, as a test tool only.
#
# Usage:  build.sh [MIRROR_DIR] [OUT_DIR]
#   MIRROR_DIR  (env MIRROR, default /work/.mirror) holds one git repository per
#               GitHub repo, named "<owner>+<name>", either bare at
#               <owner>+<name>/repo (layout the `fetch` tool produces), or a bare
#               repo / normal clone at <owner>+<name> itself.
#   OUT_DIR     (env OUT, default the directory of this script); the binary goes
#               to $OUT/bin/h2spec, the scratch tree to $OUT/build.
#
# No network is needed except apt (deb.debian.org) for the Debian packages.
# The Go module proxy is NOT used (GOPROXY=off): every module is taken from a
# local git checkout pinned to the exact commit go.mod/go.sum name, and wired
# in with `replace` directives (module mode, GOFLAGS=-mod=mod).
#
# Sources (GitHub repo @ commit  ->  Go module version in h2spec's go.mod):
#   summerwind/h2spec      @ af83a65f0b6273ef38bf778d400d98892e7653d8 (master, 2022-06-25; latest tag v2.6.0 is 5 commits older)
#   golang/net             @ 55a3084c9119aeb9ba2437d595b0a7e9cb635da9 -> golang.org/x/net v0.0.0-20161104230106-55a3084c9119
#   golang/sys             @ 3b5209105503162ded1863c307ac66fec31120dd -> golang.org/x/sys v0.0.0-20190209173611-3b5209105503
#   spf13/cobra            @ dc208f4211e7f6df7ec8cb62640f57d3e154910d -> github.com/spf13/cobra v0.0.0-20170118185516-dc208f4211e7
#   spf13/pflag            @ 298182f68c66c05229eb03ac171abe6e309ee79a -> github.com/spf13/pflag v1.0.3 (tag)
#   fatih/color            @ bf82308e8c8546dc2b945157173eb8a959ae9505 -> github.com/fatih/color v0.0.0-20161025120501-bf82308e8c85
#   mattn/go-colorable     @ efa589957cd060542a26d2dd7832fd6a6c6c3ade -> github.com/mattn/go-colorable v0.1.0 (tag)
#   mattn/go-isatty        @ 6ca4dbf54d38eea1a992b3c722a76a5d1c4cb25c -> github.com/mattn/go-isatty v0.0.4 (tag)
#   inconshreveable/mousetrap @ 76626ae9c91c4f2a10f34cad8ce83ea42c93bb75 -> github.com/inconshreveable/mousetrap v1.0.0 (tag)
#     (mousetrap and go-colorable are Windows-only at run time but still listed in go.mod)
# Debian packages (bookworm): golang-go (Go 1.19), git, tar.
# Get the repos on a fresh machine with e.g. `git clone --bare https://github.com/<owner>/<name> MIRROR/<owner>+<name>`
# (or the `fetch` tool: github:<owner>/<name>).
set -euo pipefail

MIRROR=${1:-${MIRROR:-/work/.mirror}}
OUT=${2:-${OUT:-$(cd "$(dirname "$0")/../.." && pwd)/target/h2spec}}
BUILD=$OUT/build
H2SPEC_COMMIT=${H2SPEC_COMMIT:-af83a65f0b6273ef38bf778d400d98892e7653d8}
H2SPEC_VERSION=${H2SPEC_VERSION:-2.6.0+af83a65}

# module path | GitHub owner+name | commit
DEPS=(
  "golang.org/x/net|golang+net|55a3084c9119aeb9ba2437d595b0a7e9cb635da9"
  "golang.org/x/sys|golang+sys|3b5209105503162ded1863c307ac66fec31120dd"
  "github.com/spf13/cobra|spf13+cobra|dc208f4211e7f6df7ec8cb62640f57d3e154910d"
  "github.com/spf13/pflag|spf13+pflag|298182f68c66c05229eb03ac171abe6e309ee79a"
  "github.com/fatih/color|fatih+color|bf82308e8c8546dc2b945157173eb8a959ae9505"
  "github.com/mattn/go-colorable|mattn+go-colorable|efa589957cd060542a26d2dd7832fd6a6c6c3ade"
  "github.com/mattn/go-isatty|mattn+go-isatty|6ca4dbf54d38eea1a992b3c722a76a5d1c4cb25c"
  "github.com/inconshreveable/mousetrap|inconshreveable+mousetrap|76626ae9c91c4f2a10f34cad8ce83ea42c93bb75"
)

# --- Debian packages -------------------------------------------------------
need=()
command -v go  >/dev/null || need+=(golang-go)
command -v git >/dev/null || need+=(git)
if ((${#need[@]})); then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
go version

gitdir() {  # locate the git dir for <owner>+<name>
  local d=$MIRROR/$1
  for c in "$d/repo" "$d/.git" "$d"; do
    if git --git-dir="$c" rev-parse --git-dir >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo "missing git repository for $1 under $MIRROR" >&2; return 1
}

export_tree() {  # export_tree <owner+name> <commit> <dest>
  local g; g=$(gitdir "$1")
  git --git-dir="$g" cat-file -e "$2^{commit}" || { echo "commit $2 not in $g" >&2; return 1; }
  rm -rf "$3"; mkdir -p "$3"
  git --git-dir="$g" archive --format=tar "$2" | tar -x -C "$3"
}

# --- source trees ------------------------------------------------------------
rm -rf "$BUILD"; mkdir -p "$BUILD/deps" "$OUT/bin"
export_tree summerwind+h2spec "$H2SPEC_COMMIT" "$BUILD/h2spec"
for e in "${DEPS[@]}"; do
  IFS='|' read -r mod repo commit <<<"$e"
  dir=$BUILD/deps/$repo
  export_tree "$repo" "$commit" "$dir"
  # These old commits predate go.mod; a local replace target needs one.
  [ -f "$dir/go.mod" ] || printf 'module %s\n\ngo 1.12\n' "$mod" >"$dir/go.mod"
  (cd "$BUILD/h2spec" && go mod edit -replace="$mod=$dir")
done

# --- build -------------------------------------------------------------------
export GOPROXY=off GOFLAGS=-mod=mod GONOSUMDB='*' GOSUMDB=off \
       GOTOOLCHAIN=local CGO_ENABLED=0 GO111MODULE=on \
       GOPATH=$BUILD/gopath GOCACHE=$BUILD/gocache
cd "$BUILD/h2spec"
nice go build -p 1 -trimpath \
  -ldflags "-s -w -X main.VERSION=$H2SPEC_VERSION -X main.COMMIT=$H2SPEC_COMMIT" \
  -o "$OUT/bin/h2spec" ./cmd/h2spec
"$OUT/bin/h2spec" --version
echo "built $OUT/bin/h2spec"
