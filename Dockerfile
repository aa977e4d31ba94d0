# One image for every Chest-Aid process (web, ingester, worker, migrate).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY core ./core
COPY worker ./worker
COPY web ./web
COPY training ./training
COPY migrations ./migrations
COPY alembic.ini ./
COPY models ./models
RUN pip install --upgrade pip && pip install -e .
RUN useradd --create-home --uid 1000 chestaid && mkdir -p /data /inbox && chown chestaid /data /inbox
USER chestaid
ENV CHESTAID_DATA_DIR=/data CHESTAID_INBOX=/inbox CHESTAID_MODEL_DIR=/app/models/default
EXPOSE 8000
CMD ["chestaid", "web", "--host", "0.0.0.0", "--port", "8000"]
