# The sidecar image. Build steps are the commands CI runs (./tg builds the same targets);
# the runtime image is small and runs as a non-root user.
#   docker build -t tollgate-sidecar .
#   docker run -e TOLLGATE_REDIS_URL=... -e TOLLGATE_DATABASE_URL=... -e TOLLGATE_ADMIN_TOKEN=... \
#     -e TOLLGATE_DECISION_TOKEN=... -e TOLLGATE_KEY_PEPPER=... tollgate-sidecar
# Without the two URLs it runs on the embedded store with its SQLite ledger in /var/lib/tollgate
# (mount a volume there to keep it).
#
# Ports: 8700 is the decision API (the filter's callouts, with TOLLGATE_DECISION_TOKEN — the
# sidecar refuses to start on 0.0.0.0 without one), the admin API and /metrics: reachable only
# from the gateway's Envoy and the operator, never the internet. 8701 serves the billing
# providers' webhooks (Stripe, RevenueCat) when TOLLGATE_WEBHOOK_LISTEN or server.webhook_listen
# is set to 0.0.0.0:8701: the only port to publish.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN rustup target add wasm32-wasip1 \
 && cargo build --release --bin tollgate-sidecar \
 && cargo build --profile wasm --target wasm32-wasip1 -p tollgate-filter

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /nonexistent tollgate \
 && mkdir -p /var/lib/tollgate && chown 10001 /var/lib/tollgate
COPY --from=build /src/target/release/tollgate-sidecar /usr/local/bin/tollgate-sidecar
COPY --from=build /src/host-sidecar/tollgate.toml /etc/tollgate/tollgate.toml
# The filter, for an Istio WasmPlugin (or any Envoy) to fetch: see envoy/istio/.
COPY --from=build /src/target/wasm32-wasip1/wasm/tollgate_filter.wasm /usr/share/tollgate/tollgate_filter.wasm
USER 10001
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml TOLLGATE_LISTEN=0.0.0.0:8700 \
    TOLLGATE_SQLITE_PATH=/var/lib/tollgate/ledger.sqlite
VOLUME /var/lib/tollgate
EXPOSE 8700 8701
ENTRYPOINT ["/usr/local/bin/tollgate-sidecar"]
