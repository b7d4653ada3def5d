# rwproxy itself (the MariaDB servers run elsewhere).
# Build: docker build -t rwproxy .   Run: docker run -v $PWD/rwproxy.toml:/etc/rwproxy/rwproxy.toml -p 6033:6033 rwproxy
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home rwproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/rwproxy.toml /etc/rwproxy/rwproxy.toml
USER rwproxy
# 6033: clients. 6032 (admin SQL port) and 9033 (/metrics, /health/ready) only when the config
# turns them on; inside a container give them "0.0.0.0:..." (they default to loopback).
EXPOSE 6033 6032 9033
# `docker stop` sends SIGTERM: rwproxy drains (not ready, transactions finish, exit by
# [proxy] shutdown_timeout, 30 s); give `docker stop -t` at least that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rwproxy", "serve", "--config", "/etc/rwproxy/rwproxy.toml"]
