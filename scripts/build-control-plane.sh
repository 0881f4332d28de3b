#!/usr/bin/env bash
# Builds the real Kubernetes components the e2e suite runs (etcd, kube-apiserver,
# kube-controller-manager, kube-proxy, helm) from the Go modules pinned in
# e2e/k8s/{kubernetes,etcd,helm}, into a cache directory outside the repository.
#
#   scripts/build-control-plane.sh            build if needed, print the bin directory
#   scripts/build-control-plane.sh --regenerate
#                                             rewrite e2e/k8s/kubernetes/go.mod's replace
#                                             block from the pinned release's own go.mod
#
# The cache key holds every pinned version, the Go version and a hash of the
# go.mod/go.sum files, so a bump builds afresh and an unchanged tree does nothing.
# PLANPROXY_K8S_CACHE moves the cache (default /var/cache/planproxy).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mods="$root/e2e/k8s"
log() { echo "build-control-plane: $*" >&2; }

module_version() { # <module dir> <module path>
    go -C "$1" list -m -f '{{.Version}}' "$2"
}

if [ "${1:-}" = "--regenerate" ]; then
    kver="$(module_version "$mods/kubernetes" k8s.io/kubernetes)"
    staging="v0.${kver#v1.}"
    modfile="$(go mod download -json "k8s.io/kubernetes@$kver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    block="$(grep -E '=> \./staging/src/' "$modfile" | awk -v s="$staging" '{print "\t" $1 " => " $1 " " s}')"
    awk -v block="$block" '
        /^replace \($/ { print; print block; skip = 1; next }
        skip && /^\)$/ { skip = 0 }
        !skip { print }' "$mods/kubernetes/go.mod" >"$mods/kubernetes/go.mod.new"
    mv "$mods/kubernetes/go.mod.new" "$mods/kubernetes/go.mod"
    go -C "$mods/kubernetes" mod tidy
    log "replace block regenerated for k8s.io/kubernetes $kver ($staging)"
    exit 0
fi

command -v go >/dev/null || { log "needs the go toolchain on PATH"; exit 1; }
kver="$(module_version "$mods/kubernetes" k8s.io/kubernetes)"
ever="$(module_version "$mods/etcd" go.etcd.io/etcd/server/v3)"
hver="$(module_version "$mods/helm" helm.sh/helm/v4)"
gover="$(go env GOVERSION)"
sum="$(cat "$mods"/*/go.mod "$mods"/*/go.sum | sha256sum | cut -c1-12)"
cache="${PLANPROXY_K8S_CACHE:-/var/cache/planproxy}"
dir="$cache/k8s-$kver-etcd-$ever-helm-$hver-$gover-$sum"
bins=(etcd kube-apiserver kube-controller-manager kube-proxy helm)

complete() { for b in "${bins[@]}"; do [ -x "$dir/bin/$b" ] || return 1; done; }
if complete; then
    echo "$dir/bin"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
if complete; then # another build finished while we waited
    echo "$dir/bin"
    exit 0
fi

work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

minor="${kver#v1.}"
minor="${minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$kver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

log "building kube-apiserver, kube-controller-manager, kube-proxy $kver with $gover"
go -C "$mods/kubernetes" build -trimpath -tags=notest,grpcnotrace -ldflags "-s -w$stamp" -o "$work/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-proxy
log "kubernetes done after $((SECONDS - start)) s; building etcd $ever"
go -C "$mods/etcd" build -trimpath -ldflags "-s -w" -o "$work/etcd" go.etcd.io/etcd/server/v3
log "etcd done after $((SECONDS - start)) s; building helm $hver"
go -C "$mods/helm" build -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$hver" -o "$work/helm" helm.sh/helm/v4/cmd/helm
log "all built in $((SECONDS - start)) s"

mkdir -p "$dir"
rm -rf "$dir/bin"
mv "$work" "$dir/bin"
chmod 755 "$dir/bin"
trap - EXIT
echo "$dir/bin"
