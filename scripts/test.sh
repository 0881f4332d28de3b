#!/usr/bin/env bash
# Runs every planproxy test: formatting, lints, unit and property tests, the
# data-plane tests on the real kernel (network namespaces, iptables), the e2e
# suite against a real control plane, and the Helm chart tests. Needs root on
# Linux (Debian/Ubuntu) and a Go toolchain (1.24 or newer); installs the system
# and Python packages the tests use when they are missing, and builds etcd,
# kube-apiserver, kube-controller-manager, kube-proxy and helm from their
# pinned Go modules into a cache outside the repository on the first run
# (scripts/build-control-plane.sh; nothing to do once cached).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in iptables:iptables ip6tables:iptables nft:nftables ip:iproute2 conntrack:conntrack flock:util-linux; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
if ((${#need_apt[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ -f charts/tests/requirements.txt ]; then
    python3 -m pip install -q --disable-pip-version-check -r charts/tests/requirements.txt
fi

command -v go >/dev/null 2>&1 || { echo "test.sh: the control plane is built with Go; install go 1.24+" >&2; exit 1; }
# On a fresh machine the Go build (half an hour, much of it module downloads)
# runs beside the Rust build instead of before it; the tests wait for both.
k8s_bin_file="$(mktemp)"
trap 'rm -f "$k8s_bin_file"' EXIT
bash scripts/build-control-plane.sh >"$k8s_bin_file" &
k8s_build=$!

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The e2e suite runs the controller and agent binaries as real processes.
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-run

wait "$k8s_build" || { echo "test.sh: building the control plane failed" >&2; exit 1; }
PLANPROXY_K8S_BIN="$(cat "$k8s_bin_file")"
export PLANPROXY_K8S_BIN
cargo test --workspace --locked
if [ -f charts/tests/test_chart.py ]; then
    python3 -m pytest -q charts/tests
fi
