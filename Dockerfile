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
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --create-home duet
USER duet

# Overridden per service in docker-compose.yml.
CMD ["python", "-m", "duetserve.services.launcher"]
