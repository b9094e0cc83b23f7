# syntax=docker/dockerfile:1
# Build: every Skald binary in one release build.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/coordinator target/release/participant target/release/sagactl target/release/demo /out/

# Run: only the binaries, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home skald
COPY --from=builder /out/ /usr/local/bin/
USER skald
EXPOSE 8080
CMD ["coordinator"]
