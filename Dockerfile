# One image for every pipeq process; the command picks the role (worker, flower, up).
# Build for GPUs with a CUDA torch: docker build --build-arg TORCH_SPEC="torch==2.13.0" \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/models
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY workers ./workers
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC" \
 && pip install --no-cache-dir -c constraints.txt ".[worker,stack]"
# A user of its own, owning the model cache: a named volume mounted at /models starts as
# a copy of this directory, owner included, so the first download can write there.
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin pipeq \
 && mkdir -p /models && chown pipeq:pipeq /models
USER pipeq
ENTRYPOINT ["pipeq"]
