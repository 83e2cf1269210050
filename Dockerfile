# Converge image. CPU by default; for GPUs build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t converge:cuda .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.2,<3"
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY service ./service
COPY studies ./studies
COPY trainers ./trainers
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["converge"]
CMD ["--help"]
