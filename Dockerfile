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
EXPOSE 6033
ENTRYPOINT ["rwproxy", "serve", "--config", "/etc/rwproxy/rwproxy.toml"]
