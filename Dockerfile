# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain, ship only the binary on a distroless base.
#   docker build --build-arg SSEHUB_COMMIT=$(git rev-parse --short=12 HEAD) -t ssehub .
#   docker run -p 8080:8080 -e SSEHUB__REDIS__URL=redis://redis:6379 ssehub
# Configuration: /etc/ssehub/config.toml is deploy/config.toml, closed by default (no public
# channel, no demo page); the repo's config.toml is the quick-start config and is not in the
# image. Override single keys with SSEHUB__<SECTION>__<KEY> variables (e.g.
# -e SSEHUB__CHANNELS__PUBLIC='news:*') or mount your own file over it.
# Checked without Docker by scripts/check-docker-context (CI runs it).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
# Cargo.toml lists the bench/ workspace member: cargo needs its manifest to load the workspace
# (and Cargo.lock, checked by --locked, covers it). Its sources are not needed: only the ssehub
# binary is built.
COPY bench/Cargo.toml bench/
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin ssehub \
    && rm -rf src
COPY src ./src
ARG SSEHUB_COMMIT=unknown
ENV SSEHUB_COMMIT=${SSEHUB_COMMIT}
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin ssehub

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ssehub /usr/local/bin/ssehub
COPY deploy/config.toml /etc/ssehub/config.toml
# In a container the admin listener must be reachable by Prometheus and the orchestrator.
ENV SSEHUB__ADMIN__LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
USER nonroot:nonroot
# The binary probes its own /healthz: no shell or curl needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/ssehub", "--config", "/etc/ssehub/config.toml", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ssehub", "--config", "/etc/ssehub/config.toml"]
