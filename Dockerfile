# Converge image, CPU or CUDA by build argument:
#   docker build --build-arg VARIANT=cpu  -t converge:cpu .
#   docker build --build-arg VARIANT=cuda -t converge:cuda .     (CUDA 12.8 wheels; TORCH_CUDA_INDEX overrides)
FROM python:3.11-slim
ARG VARIANT=cpu
ARG TORCH_SPEC="torch>=2.2,<3"
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /app
RUN case "$VARIANT" in \
      cpu)  index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index="$TORCH_CUDA_INDEX" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac && pip install --no-cache-dir --index-url "$index" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY core ./core
COPY service ./service
COPY studies ./studies
COPY trainers ./trainers
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir .
ENV CONVERGE_VARIANT=$VARIANT
EXPOSE 8000
ENTRYPOINT ["converge"]
CMD ["--help"]
