# One image for both roles: `p2pdist daemon` (the default command) and `p2pdist scheduler`.
#
#   docker build -t p2pdist .
#
# BASE is any Debian-like image with Python 3.11+ as `python3` and its venv module
# (python:3.11-slim by default; CI builds a debootstrapped Debian bookworm, where no image
# can be pulled).  PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX are pip's own settings,
# passed through for builds against a private mirror or a local wheelhouse (CI builds
# offline: --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY p2pdist ./p2pdist
COPY scheduler ./scheduler
COPY bench ./bench
# A virtualenv in /opt/p2pdist without pip and setuptools (the runtime installs nothing),
# and without zstandard's cffi backend (12 MB; its C extension is the one used, checked).
RUN python3 -m venv /opt/p2pdist \
    && /opt/p2pdist/bin/pip install --no-cache-dir /src \
    && /opt/p2pdist/bin/pip uninstall --yes pip setuptools \
    && rm -f /opt/p2pdist/lib/python3*/site-packages/zstandard/_cffi.*.so \
    && /opt/p2pdist/bin/python -c "import p2pdist.cli, scheduler.service, zstandard; \
assert zstandard.backend == 'cext', zstandard.backend"

FROM ${BASE}
# A fixed uid/gid, so that Kubernetes manifests can name them (runAsUser, hostPath owner).
RUN groupadd --system --gid 10001 p2pdist \
    && useradd --system --uid 10001 --gid p2pdist --home-dir /var/lib/p2pdist \
        --create-home --shell /usr/sbin/nologin p2pdist
COPY --from=build /opt/p2pdist /opt/p2pdist
ENV PATH=/opt/p2pdist/bin:$PATH \
    P2PDIST_DATA_DIR=/var/lib/p2pdist \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/p2pdist
VOLUME ["/var/lib/p2pdist"]
# peer server, registry proxy, local API (daemon); the scheduler listens on 65004.
EXPOSE 65001 65002 65003 65004
# The daemon's local API (its address from the same config: P2PDIST_CONFIG or
# P2PDIST_API_LISTEN).  For the scheduler role:
#   --health-cmd 'p2pdist health --url http://127.0.0.1:65004/healthz'
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["p2pdist", "health"]
ENTRYPOINT ["p2pdist"]
CMD ["daemon"]
