# Pi Agent Server in a container: slim, not root, for arm64 (a Pi 4/5 with a 64-bit OS) and
# amd64 alike (nothing here is built for one of them). With Ollama beside it: compose.yaml.
#   docker build -t pi-agent .
#   docker run -p 8000:8000 -v pi-agent-state:/var/lib/pi-agent -v "$PWD/keys:/etc/pi-agent:ro" \
#       -e PI_AGENT_OLLAMA_URL=http://ollama:11434 pi-agent
# (keys/keys.json readable by all: it holds hashes only; docs/deployment.md, "In a container")
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --home-dir /var/lib/pi-agent --shell /usr/sbin/nologin pi-agent \
    && install -d -o pi-agent -g pi-agent -m 0700 /var/lib/pi-agent

WORKDIR /opt/pi-agent
COPY setup.cfg pyproject.toml README.md ./
COPY pi_agent ./pi_agent
RUN pip install .
COPY wsgi.py gunicorn.conf.py ./

# A container is reached from outside its own loopback: it listens on every address, which
# the server allows only with API keys (mount the key file, as above). Memory in the SQLite
# store on the volume, so that a new container forgets nothing.
ENV PI_AGENT_BIND=0.0.0.0:8000 \
    PI_AGENT_STORE=sqlite \
    PI_AGENT_STATE_DIR=/var/lib/pi-agent \
    PI_AGENT_KEYS_FILE=/etc/pi-agent/keys.json
VOLUME /var/lib/pi-agent
EXPOSE 8000
USER pi-agent

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# gunicorn stops on SIGTERM, giving running streams graceful_timeout (60 s): give
# `docker stop` more time than that (docker stop -t 90, stop_grace_period in compose.yaml).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
