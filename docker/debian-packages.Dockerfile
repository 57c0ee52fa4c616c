# An image holding Debian packages: local stand-ins for the official nginx and Prometheus images
# where Docker Hub cannot be reached (scripts/docker_check.sh uses them). The compose file names
# every binary and flag itself, so the stand-ins behave like the official images there.
#
#   docker build -f docker/debian-packages.Dockerfile --build-arg PACKAGES=nginx -t local/nginx docker
#   NGINX_IMAGE=local/nginx docker compose -f docker/docker-compose.yml up
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG PACKAGES
ARG DEBIAN_FRONTEND=noninteractive
RUN test -n "${PACKAGES}" \
    && apt-get update \
    && apt-get install -y --no-install-recommends ${PACKAGES} \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
