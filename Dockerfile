# syntax=docker/dockerfile:1
# Offramp image for the Helm chart (helm/offramp): Ray 2.60 + the offramp package, whose wheel
# carries the embedded default model (offramp/models/default), so pods download nothing.
#
#   docker build -t ghcr.io/offramp/offramp:0.1.0 .                                  # CPU (head, CPU pool)
#   docker build -t ghcr.io/offramp/offramp:0.1.0-gpu --build-arg VARIANT=gpu .      # GPU pool
#
# Both variants share the Ray and Python versions, as every node of a Ray cluster must.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu128
# cpu | gpu: picks the base image and the torch wheel index below.
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS base-cpu
# CPU-only torch: the default PyPI wheel would pull several GB of CUDA libraries.
ENV OFFRAMP_TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG} AS base-gpu
ENV OFFRAMP_TORCH_INDEX=https://download.pytorch.org/whl/${CUDA_TAG}

FROM base-${VARIANT}
# Global ARGs must be re-declared to be visible inside a stage.
ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0
LABEL org.opencontainers.image.title="offramp" \
      org.opencontainers.image.description="Offramp: staged decoder LM serving with early exits on Ray Serve" \
      io.offramp.variant="${VARIANT}"

# The Ray images run as user "ray" (uid 1000, gid 100) and own their Python environment,
# so everything installs without root.
USER 1000:100
WORKDIR /home/ray/build

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${OFFRAMP_TORCH_INDEX}"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 offramp ./offramp
# A regular (non-editable) install: package data (the embedded model) lands in site-packages.
# Ray is already in the image at the pinned version; pip keeps it.
RUN pip install --no-cache-dir . \
 && python -c "import offramp, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && cd /home/ray && rm -rf /home/ray/build

WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1
# KubeRay supplies the command (ray start ...); this default is for a quick local check.
CMD ["python", "-c", "import offramp; print('offramp', offramp.__name__)"]
