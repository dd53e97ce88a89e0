# The autoglm worker/API and the MLflow server image (docker-compose.yml builds both from it).
FROM python:3.11-slim
WORKDIR /app
# torch first, the CPU build: any other spec pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt README.md ./
COPY autoglm autoglm
COPY search search
COPY streams streams
COPY consumers consumers
COPY feedback feedback
COPY registry registry
RUN pip install --no-cache-dir -c constraints.txt . psycopg2-binary==2.9.13
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EXPOSE 8000
CMD ["autoglm", "worker", "--help"]
