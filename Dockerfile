# syntax=docker/dockerfile:1
# Herald: one binary, `herald`. Built here, run by docker-compose.yml:
#   docker build -t herald .
#   docker run --rm herald herald --help

# Build stage. rust:1-bookworm (not plain rust:1, which may move to a newer
# Debian) so the binary's glibc matches the bookworm runtime below.
FROM rust:1-bookworm AS builder
WORKDIR /src
# The workspace's .cargo/config.toml points target-dir at /var/tmp/herald-target;
# keep the build inside the stage (and its cache mount) instead.
ENV CARGO_TARGET_DIR=/src/target
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p herald \
 && install -D -m 0755 /src/target/release/herald /out/herald

# Runtime stage.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin herald
WORKDIR /app
COPY --from=builder /out/herald /usr/local/bin/herald
# Every default lives in config/default.toml; HERALD_* variables override it.
COPY config/ /app/config/
USER herald
ENV HERALD_HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
CMD ["herald", "serve"]
