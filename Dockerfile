# The caas crypto service. Multi-stage: the service's wheel is built in the first stage; the runtime image
# installs its dependencies from requirements.lock (exact versions, hashes checked, wheels only: `make lock`),
# has no compiler, no protoc and no build tools, runs as a non-root user, and reads the root key from a
# secret file.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client client
COPY crypto_server crypto_server
COPY crypto_client crypto_client
# Two distributions: the client (client/pyproject.toml) and the server, which depends on it.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./client .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 crypto \
    && useradd --system --uid 10001 --gid crypto --home-dir /var/lib/caas-crypto --create-home crypto
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
# The service itself, without resolving anything: every dependency came from the lock above.
RUN pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/caas-crypto
ENV CRYPTO_HOST=0.0.0.0 \
    CRYPTO_PORT=3009 \
    CRYPTO_METRICS_PORT=9109 \
    CRYPTO_DATA_DIR=/var/lib/caas-crypto/data \
    CRYPTO_ROOT_KEY_FILE=/run/secrets/crypto_root_key \
    PYTHONUNBUFFERED=1
EXPOSE 3009 9109
STOPSIGNAL SIGTERM
# A real grpc.health.v1 check, by the small client shipped in the package (no downloaded probe binary).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["crypto-healthcheck"]
ENTRYPOINT ["crypto-server"]
