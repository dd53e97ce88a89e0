# The image of the autoglm roles (ingest, serve, learn) and of the MLflow server;
# docker-compose.yml builds it once as open-autoglm:local.
FROM python:3.11-slim
WORKDIR /app
# torch first, the CPU build: any other spec pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt README.md ./
COPY autoglm autoglm
COPY roles roles
COPY search search
COPY streams streams
COPY consumers consumers
COPY feedback feedback
COPY registry registry
RUN pip install --no-cache-dir -c constraints.txt . psycopg2-binary==2.9.13
# Not root. /data (the roles' --data-dir) and /mlflow/artifacts belong to that user, and a new
# named volume mounted there starts with that ownership.
RUN useradd --system --uid 10001 --home-dir /data autoglm \
    && mkdir -p /data /mlflow/artifacts && chown autoglm:autoglm /data /mlflow/artifacts
USER autoglm
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["autoglm", "--help"]
