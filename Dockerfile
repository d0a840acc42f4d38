# The Tardigrade worker image: `tardigrade worker` with bubblewrap for local sandboxes and the cloud-store SDKs.
#   docker build -t tardigrade-worker .
#   docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined -e TEMPORAL_ADDRESS=... -e TARDIGRADE_STORE=s3://... tardigrade-worker
# (docker-compose.temporal.yml runs it beside the server; the README's "Deployment" says why each option.)
FROM python:3.12-slim-bookworm

# bubblewrap runs the sandboxes; slirp4netns gives `network: true` sandboxes their own user-mode network.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap slirp4netns ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir ".[s3,gcs,azure,openai,encryption]" && rm -rf /src

# The worker runs as an ordinary user: bubblewrap needs no setuid bit or capability, only user namespaces.
RUN useradd --create-home --uid 10001 tardigrade && mkdir -p /var/lib/tardigrade && chown tardigrade /var/lib/tardigrade
USER tardigrade
ENV TARDIGRADE_HOME=/var/lib/tardigrade
WORKDIR /home/tardigrade

# SIGTERM (docker stop) lets running steps finish before the worker exits.
STOPSIGNAL SIGTERM
CMD ["tardigrade", "worker"]
