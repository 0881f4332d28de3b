# syntax=docker/dockerfile:1
#
# One image with both planproxy binaries:
#   planproxy-controller  (the Deployment; the chart runs it as UID 65532)
#   planproxy-agent       (the DaemonSet; the chart runs it as root with only
#                          NET_ADMIN and NET_RAW)
#
#   docker build -t planproxy:0.1.0 .
#
# The tag should match the chart's appVersion (charts/planproxy/Chart.yaml), which
# is the chart's default image tag.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest even to build two of them.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p planproxy-controller -p planproxy-node-agent \
 && install -D -m 0755 target/release/planproxy-controller /out/planproxy-controller \
 && install -D -m 0755 target/release/planproxy-agent /out/planproxy-agent

FROM debian:${DEBIAN_RELEASE}-slim
# iptables: iptables-restore/-save for the agent, both the nf_tables and the legacy
# backend (the agent detects which one the host's rules use and runs that one);
# nftables: nft for --backend nftables; conntrack: clearing stale UDP flows; ca-certificates: TLS to an API server named
# by k8sServiceHost.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Non-root by default; the chart runs the agent as root explicitly.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/planproxy-controller"]
CMD ["--help"]
