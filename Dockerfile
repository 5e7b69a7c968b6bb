# Builds the fleetwatch hub and firmware-sim into a small runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM debian:bookworm-slim
RUN useradd --system --home /data --create-home fleetwatch
COPY --from=build /src/target/release/fleetwatch /src/target/release/firmware-sim /usr/local/bin/
USER fleetwatch
WORKDIR /data
# 1883: the embedded broker (default mode); unused in external mode. 8080: HTTP API
# and dashboard (set FLEETWATCH_HTTP__LISTEN=0.0.0.0:8080 and an API key to reach it).
EXPOSE 1883 8080
ENTRYPOINT ["fleetwatch"]
CMD ["serve"]
