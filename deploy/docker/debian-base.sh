#!/usr/bin/env bash
# Builds, from Debian's own packages, the two images pipeq's compose stack starts FROM,
# for a machine that cannot pull from Docker Hub (CI here): one image standing in for both
# python:3.11-slim (Debian's Python 3.11 in a venv at /usr/local, so `python` and `pip`
# are on PATH as in the official image) and redis:7 (Debian's redis-server 7).
#
#   deploy/docker/debian-base.sh [TAG]            # TAG: pipeq-base:bookworm by default
#   docker build --build-arg BASE_IMAGE=TAG -t pipeq:latest .
#   PIPEQ_REDIS_IMAGE=TAG docker compose up -d
#
# Needs mmdebstrap (Debian's package) and a Debian mirror ($DEBIAN_MIRROR). Users who can
# pull the official images need none of this: the Dockerfile and docker-compose.yml name
# them by default.
set -euo pipefail
tag=${1:-pipeq-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mmdebstrap --quiet --variant=minbase --components=main \
    --include=python3,python3-venv,redis-server,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" python3 -m venv /usr/local' \
    bookworm - "$mirror" |
    docker import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$tag" >/dev/null
echo "$tag"
