# syntax=docker/dockerfile:1
# One image for both roles: `p2pdist daemon` (default) and `p2pdist scheduler`.
# BASE lets CI build from a locally made Debian+Python image where no base can be pulled.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY p2pdist ./p2pdist
COPY scheduler ./scheduler
COPY bench ./bench
RUN python3 -m venv /opt/p2pdist \
    && /opt/p2pdist/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/p2pdist/bin/pip install --no-cache-dir .

FROM ${BASE}
RUN groupadd --system p2pdist \
    && useradd --system --gid p2pdist --home-dir /var/lib/p2pdist --create-home p2pdist
COPY --from=build /opt/p2pdist /opt/p2pdist
ENV PATH=/opt/p2pdist/bin:$PATH \
    P2PDIST_DATA_DIR=/var/lib/p2pdist \
    PYTHONUNBUFFERED=1
USER p2pdist
WORKDIR /var/lib/p2pdist
VOLUME ["/var/lib/p2pdist"]
ENTRYPOINT ["p2pdist"]
CMD ["daemon"]
