# fewstep: one image for the gateway, the engine workers and the companion training worker.
#   docker build -t fewstep:cpu .
#   docker build -t fewstep:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=gpu .
# The command picks the role: `fewstep serve` (default), `fewstep worker`, `fewstep trainer`.
FROM python:3.11-slim AS build
# torch is pinned (2.13.0) and taken from an explicit index: from PyPI an unpinned torch is a
# multi-GB CUDA build even on CPU nodes.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY fewstep ./fewstep
# The runtime set comes from the lock (exact versions, the same in every image); extras (EXTRAS=gpu, openvino,
# onnx, ...) are resolved on top of it, constrained by it.
RUN python -m venv /opt/fewstep \
 && /opt/fewstep/bin/pip install --no-cache-dir --upgrade "pip==25.3" \
 && /opt/fewstep/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==2.13.0" \
 && /opt/fewstep/bin/pip install --no-cache-dir -r requirements.lock \
 && /opt/fewstep/bin/pip install --no-cache-dir --no-deps . \
 && if [ -n "$EXTRAS" ]; then /opt/fewstep/bin/pip install --no-cache-dir -c requirements.lock ".[$EXTRAS]"; fi

FROM python:3.11-slim
COPY --from=build /opt/fewstep /opt/fewstep
# The shipped reference checkpoints seed an empty registry on first start (FEWSTEP_CHECKPOINTS).
COPY checkpoints /opt/fewstep-checkpoints
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin fewstep \
 && mkdir -p /var/lib/fewstep/registry && chown -R fewstep /var/lib/fewstep
# Pods run with a read-only root filesystem and an emptyDir at /tmp: caches go there.
ENV PATH=/opt/fewstep/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FEWSTEP_HOST=0.0.0.0 \
    FEWSTEP_REGISTRY=/var/lib/fewstep/registry \
    FEWSTEP_CHECKPOINTS=/opt/fewstep-checkpoints \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001
WORKDIR /home/fewstep
# 8000: the gateway's HTTP API; 9100: a worker's /metrics (`fewstep worker --metrics-port 9100`).
EXPOSE 8000 9100
ENTRYPOINT ["fewstep"]
CMD ["serve"]
