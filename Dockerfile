# syntax=docker/dockerfile:1
# snigress container image: the release binary on a distroless glibc base.
#   docker build -t snigress .
#   docker run --rm -p 8443:8443 -p 9901:9901 -v "$PWD/config:/etc/snigress:ro" snigress
#
# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz on the
# metrics port itself (deploy/kubernetes/deployment.yaml); a HEALTHCHECK would
# also need a shell or a client binary in the image.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.* change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && printf 'fn main() {}\n' > src/main.rs \
    && printf '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# The same command CI checks (.ci/run): the release profile, no extra features.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/snigress /usr/local/bin/snigress
# Runs as the image's numeric non-root user; needs no writable path (mount
# the config read-only; the access log goes to stdout).
USER 65532:65532
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/snigress"]
CMD ["run", "--config", "/etc/snigress/snigress.yaml"]
