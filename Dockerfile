# Finetune Studio on a CUDA GPU: `docker build -t finetune-studio . && docker run --gpus all -p 7860:7860 -v $PWD/runs:/app/runs finetune-studio`
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv git \
    && rm -rf /var/lib/apt/lists/*

# A venv: Ubuntu 24.04 forbids pip installs into the system Python.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-gpu.txt ./
# PyPI's Linux torch wheel is the CUDA build; install it before DeepSpeed, which builds against it.
RUN pip install "torch>=2.6" && pip install -r requirements-gpu.txt

COPY . .
RUN useradd --create-home studio && mkdir -p /app/runs && chown -R studio /app
USER studio
VOLUME ["/app/runs"]
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0"]
