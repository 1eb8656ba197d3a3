# Finetune Studio on CUDA GPUs (README "Deploying": a Hugging Face Docker Space or a team server):
#   docker build -t finetune-studio .
#   docker run --gpus all -p 7860:7860 -v finetune-runs:/app/runs finetune-studio
# CUDA 13.0 because PyPI's torch 2.13.0 wheel is built for it: DeepSpeed compiles its ops with this
# image's nvcc and refuses a CUDA major version other than torch's. cuDNN comes with torch's wheel.
# V100s (sm_70, dropped by CUDA 13): --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Ubuntu's archive keeps only the newest build of a package, so pinned apt versions stop building
# after the next security update; the base image tag pins the release instead.
# Compiler and headers: DeepSpeed and Triton compile their kernels at run time. tini as process 1
# reaps the processes of runs whose launcher died (the app, as process 1, would leave them zombies).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential tini \
    && rm -rf /var/lib/apt/lists/*

# A venv: Ubuntu 24.04 forbids pip installs into the system Python.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-gpu.txt ./
# torch first, from its index (DeepSpeed's build looks for it); naming it again keeps it at that version.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
    && pip install -r requirements-gpu.txt "torch==$TORCH_VERSION"

# uid 1000: Hugging Face Spaces run containers as 1000, and Ubuntu 24.04 images give it to "ubuntu".
# The code stays root-owned (read-only to the app); the user owns its runs and its home. The two
# folders exist here so that a new named volume mounted on them starts owned by the user too.
RUN userdel --remove ubuntu \
    && useradd --create-home --uid 1000 --user-group studio \
    && mkdir /app/runs /home/studio/.cache && chown studio:studio /app/runs /home/studio/.cache
COPY . .

ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 FINETUNE_STUDIO_RUNS=/app/runs HOME=/home/studio
USER 1000:1000
VOLUME ["/app/runs"]
EXPOSE 7860
# The page answers once the app has started; importing torch and gradio takes a while.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ['GRADIO_SERVER_PORT'] + '/', timeout=8)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "app.py"]
