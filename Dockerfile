# syntax=docker/dockerfile:1
#
# shimcheck's container image: one static binary on an empty base (docs/deploy.md, "Image").
#
#   docker build -t ghcr.io/shimcheck/shimcheck:0.1.0 .
#
# The build stage links glibc statically (crt-static), so the final stage needs no libc, no
# shell and no users: nothing in it but /shimcheck.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what `cargo build` reads: no target/, no fixtures, no .dockerignore needed.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/shimcheck /shimcheck

FROM scratch
LABEL org.opencontainers.image.title="shimcheck" \
      org.opencontainers.image.description="TCP connection leak metrics for a Linux node" \
      org.opencontainers.image.source="https://github.com/shimcheck/shimcheck"
COPY --from=build /shimcheck /shimcheck
# uid 0 on purpose: Kubernetes grants added capabilities (SYS_PTRACE, DAC_READ_SEARCH,
# SYS_ADMIN) as effective capabilities only to root; a non-root user would hold none of them.
# What root may do is cut down by the pod spec: every other capability dropped, read-only
# root filesystem, read-only host mounts (deploy/kubernetes/daemonset.yaml).
USER 0:0
ENTRYPOINT ["/shimcheck"]
CMD ["serve", "--all-netns"]
