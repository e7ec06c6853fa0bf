# Serving image: the ONNX file plus onnxruntime, FastAPI, uvicorn, numpy and Pillow; no torch.
#   docker build -t ftdeploy-serve .
#   docker run -p 8000:8000 -v $PWD/runs/digits/export:/models:ro ftdeploy-serve
# or bake a model in: docker build --build-arg MODEL=runs/digits/export/model.onnx -t my-model .
# onnxruntime's OpenVINO execution provider (serve --provider openvino|auto):
#   docker build --build-arg PROVIDER=openvino -t ftdeploy-serve-openvino .
# Server options go after the image name: docker run ... ftdeploy-serve --workers 2 --threads 1
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ftdeploy ./ftdeploy
ARG PROVIDER=cpu
# The project itself, with its own pins in pyproject.toml. onnxruntime-openvino replaces onnxruntime
# (both install the same `onnxruntime` module), so one is removed before the other goes in.
# hadolint ignore=DL3013
RUN pip install --no-compile ".[serve]" \
 && if [ "$PROVIDER" = "openvino" ]; then pip uninstall -y onnxruntime && pip install --no-compile "onnxruntime-openvino==1.24.1"; fi \
 && rm -rf /root/.cache

# Optional: copy a model into the image; otherwise mount one at /models/model.onnx.
ARG MODEL=""
RUN mkdir -p /models
COPY ${MODEL:-README.md} /models/
RUN if [ -n "$MODEL" ]; then mv "/models/$(basename "$MODEL")" /models/model.onnx; else rm -f /models/README.md; fi

RUN useradd --system --uid 10001 --no-create-home ftdeploy
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# Exec form: the server is PID 1 and gets SIGTERM itself, so it drains (--drain-seconds, 5 by default).
ENTRYPOINT ["ftdeploy", "serve", "/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
