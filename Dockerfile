# cairn in a container: the node, cairn-scheduler and cairn-worker in one small image.
#
#   docker build -t cairn .
#   docker run --rm -p 50051:50051 -p 8080:8080 -v cairn-data:/var/lib/cairn \
#     --security-opt seccomp=config/docker/seccomp-io-uring.json \
#     --ulimit memlock=-1:-1 cairn
#
# io_uring: Docker's default seccomp profile blocks io_uring_setup, io_uring_enter and
# io_uring_register, and the node (glommio) cannot start without them; it says so at
# start. Run with config/docker/seccomp-io-uring.json (allows io_uring and refuses the
# calls that administer the host: module loading, mount, ptrace, kexec, bpf, ...) or,
# where the host policy allows it, with `--security-opt seccomp=unconfined`. The scheduler and the worker use no io_uring and
# run under the default profile.
#
# Locked memory: glommio registers its I/O buffers in locked memory. Docker's default
# memlock limit (64 KiB or 8 MiB, depending on the engine) makes the node fall back to
# unregistered buffers, which costs throughput; `--ulimit memlock=-1:-1` (Compose:
# `ulimits: { memlock: -1 }`, Kubernetes: the container runtime's default limits) lifts
# it, the equivalent of LimitMEMLOCK=infinity in config/systemd/cairn.service.
#
# The data directory must be on a filesystem with O_DIRECT (a volume on ext4 or XFS,
# not overlayfs or tmpfs).

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole context, .git included when it is a plain clone: build.rs records the
# commit for --version ("unknown" without it).
COPY . .
RUN cargo build --release --bins \
 && mkdir /out \
 && cp target/release/cairn target/release/cairn-scheduler target/release/cairn-worker /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/cairn cairn \
 && mkdir -p /var/lib/cairn \
 && chown cairn:cairn /var/lib/cairn
COPY --from=build /out/ /usr/local/bin/
USER cairn
VOLUME /var/lib/cairn
# gRPC (REAPI) and HTTP (cache protocol, /metrics, /healthz, the status page).
EXPOSE 50051 8080
# SIGTERM drains; give `docker stop` the time config/systemd/cairn.service gives
# (docker stop --time 60, Compose stop_grace_period: 60s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cairn"]
# Cache only: execution on a network listener needs --auth (README, Security); run
# cairn-scheduler and cairn-worker from the same image with --entrypoint.
CMD ["--listen", "0.0.0.0:50051", "--http-listen", "0.0.0.0:8080", "--data-dir", "/var/lib/cairn/data", "--no-execution"]
