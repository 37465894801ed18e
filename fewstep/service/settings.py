"""Every setting and limit of the service: one pydantic-settings class, `FEWSTEP_` prefix.

Instantiated once per process (`Settings()`), then passed down. Each field's default is
validated at start-up, so a bad environment fails fast with the variable's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fewstep.service.queue import keys

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Settings(BaseSettings):
    # Inputs never appear in validation errors: they would print keys and Redis passwords at start-up.
    model_config = SettingsConfigDict(
        env_prefix="FEWSTEP_", extra="ignore", hide_input_in_errors=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface the gateway binds to."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port of the gateway."""
    registry: Path = Path("var/registry")
    """Registry root (a volume on Kubernetes)."""
    checkpoints: Path = Path("checkpoints")
    """Shipped checkpoints that seed an empty registry on start."""
    engine: Literal["registry", "noop"] = "registry"
    """What workers run: `registry`, the registry's models (the shipped students and imported pipelines, each on
    its kind's engine), or `noop` (no network: measures the serving plumbing). `image`, this setting's old name
    for `registry`, is still taken."""
    noop_step_ms: float = Field(0.0, ge=0.0, le=60_000.0)
    """Wall time per denoising step of the `noop` engine."""
    backend: str = "torch"
    """Engine backend of the image models: torch, or the exported artifacts on onnxruntime, openvino (CPU) or
    tensorrt (GPU)."""
    precision: str = "fp32"
    """Numeric precision of the backend."""
    trt_cache: Path = Path("var/trt-cache")
    """Where the tensorrt backend keeps the engines it builds (each with a manifest; a shared volume lets
    replicas on one GPU kind build once)."""
    threads: int | None = Field(None, ge=1, le=256)
    """torch / ONNX Runtime intra-op threads of every engine thread; unset: every core for the general worker
    while the interactive lane is all that runs, an even share for each engine thread while batch items run
    (`service/worker.py`, `Cores`). Oversubscribed threads slow a 2-core machine by 100×."""
    latent_device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$")
    """Device of imported pipelines' networks and latents (`cpu`, `cuda`, `cuda:N`)."""
    latent_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Numeric type of imported pipelines on the torch backend (half types on CUDA)."""
    image_min_side: int = Field(64, ge=8, le=8192)
    """Smallest width or height an imported pipeline is asked for (`size`); its native size is always served."""
    image_max_side: int = Field(1024, ge=8, le=8192)
    """Largest width or height an imported pipeline is asked for (`size`)."""

    redis_url: SecretStr | None = None
    """Redis URL; unset → the embedded in-process queue."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys; empty → no authentication (logged as a warning)."""

    min_key_chars: int = Field(16, ge=8, le=1024)
    """Shortest API or admin key accepted at start (a short key is a guessable key)."""
    auth_failures_per_s: float = Field(1.0, gt=0.0, le=1_000_000.0)
    """Sustained rate of failed authentications one client address may make; past it and its burst,
    the address gets 429 with Retry-After before its key is even checked."""
    auth_failure_burst: int = Field(20, ge=1, le=1_000_000)
    """Failed authentications one client address may make at once before `auth_failures_per_s` applies."""
    max_rate_buckets: int = Field(100_000, ge=100, le=100_000_000)
    """Most rate-limit buckets (per key, per client address) a gateway without Redis keeps in memory; the least
    recently used go first past it (buckets that have refilled are forgotten anyway)."""
    forwarded_allow_ips: str = Field("", max_length=4096)
    """Comma-separated addresses or networks (`10.0.0.0/8`) of the proxies whose `X-Forwarded-For` and
    `X-Forwarded-Proto` are trusted (uvicorn's `forwarded_allow_ips`): a client's address, as the failed-auth
    budget counts it, is then the one the proxy saw. Empty: none (the peer's address, whatever it sends); set
    it to the ingress's range, never to `*` on a port clients reach directly."""
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated `Host` names the `/v1/` routes answer (`*`: any). Unset: any when API keys are set or the
    gateway listens beyond loopback, else only loopback names, so that a web page whose DNS name is rebound to
    127.0.0.1 cannot use a key-less server on a user's own machine."""

    max_n: int = Field(8, ge=1, le=256)
    """Most images one request may ask for (`n`)."""
    max_partial_images: int = Field(3, ge=0, le=8)
    """Most partial images one streamed image request may ask for (`partial_images`; OpenAI's own limit is 3)."""
    max_prompt_chars: int = Field(500, ge=1, le=100_000)
    """Longest prompt, in characters (the text encoder reads its first 16 tokens)."""
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    """Largest request body; bigger bodies get 413 before they are read."""
    upload_max_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Largest body of an upload (`POST /v1/images/edits`: its images and fields); bigger bodies get 413 before
    they are read. Other routes keep `max_body_bytes`."""
    upload_max_pixels: int = Field(2048 * 2048, ge=64, le=64 * 1024 * 1024)
    """Most pixels (width × height) an uploaded image may say it has; more is refused with 400 from the image's
    header, before it is decoded (a decompression bomb: a few kilobytes that inflate to gigabytes)."""
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    """Largest request header block; bigger ones get 431. The HTTP parser also stops buffering a header
    block that is still arriving at twice this (a slow flood is cut off before it is complete)."""
    max_connections: int = Field(1024, ge=1, le=1_000_000)
    """Most open connections and WebSockets per gateway process; beyond it new ones get 503."""
    keep_alive_s: int = Field(75, ge=1, le=3600)
    """An idle keep-alive connection is closed after this long. Keep it longer than the idle timeout of
    the clients' connection pools and of any proxy in front (httpx and the OpenAI SDK: 5 s; ingress-nginx
    upstreams: 60 s): a client that reuses a connection just as the server closes it gets a connection
    reset (docs/decisions/keep-alive.md)."""
    head_timeout_s: float = Field(10.0, ge=0.5, le=600.0)
    """A connection must send a whole request line and headers within this long of connecting (or of its
    first byte after a keep-alive response), else it is closed: slow or silent clients hold no socket."""
    body_timeout_s: float = Field(30.0, ge=0.5, le=3600.0)
    """A request body must arrive whole within this long of its headers, else 408."""
    prompt_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, le=1 << 40)
    """Bytes of prompt encodings each imported model keeps (least recently used leave first): a prompt seen again
    skips its text encoders (a T5's or an LLM's encoding is megabytes, and the encoders cost more than a 1–4
    step image's denoiser). 0: none kept."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Most items in one worker's running batch (one network evaluation)."""
    batch_wait_ms: float = Field(0.0, ge=0.0, le=10_000.0)
    """How long a lone item waits for company when nothing runs (step-level: latecomers join at the next step)."""
    join_wait: float = Field(0.05, ge=0.0, le=1.0)
    """After items leave a running batch, wait up to this fraction of a step for newcomers to join it."""
    batching: Literal["step", "request", "none"] = "step"
    """step: items join and leave the running batch at step boundaries; request: whole batches; none: one by one."""
    max_queue: int = Field(256, ge=1)
    """Most items of synchronous requests queued or running; beyond it requests get 429 with Retry-After."""
    request_timeout_s: float = Field(120.0, gt=0.0)
    """A synchronous request that waits longer than this fails with 503 (its items are cancelled)."""
    drain_s: float = Field(120.0, ge=0.0, le=3600.0)
    """On SIGTERM, how long requests, event streams and video sessions in flight get to finish (new work
    gets 503 meanwhile) before the gateway stops listening; keep it at least `request_timeout_s`, and the
    pod's grace period above it plus its preStop pause."""

    key_requests_per_s: float = Field(50.0, gt=0.0, le=1_000_000.0)
    """Sustained rate at which one key may start work (image requests, jobs, event streams, video
    sessions); beyond it and its burst: 429 with Retry-After."""
    key_burst: int = Field(100, ge=1, le=1_000_000)
    """How many work-starting requests one key may make at once before `key_requests_per_s` applies."""
    key_max_sync_cost: int = Field(128, ge=1)
    """Most network evaluations (the model's count: steps, twice with classic guidance, and a hybrid's
    teacher hand-off) of one key's synchronous requests queued or running; beyond it 429. At most half of
    `max_queue` (an item costs at least one evaluation), so one key always leaves the other half of the
    interactive lane to others; left unset, it is lowered to that half."""
    key_max_job_cost: int = Field(5_000, ge=1)
    """Most network evaluations of one key's batch jobs queued or running; beyond it `POST /v1/jobs` gets 429.
    At most half of `max_job_queue`, as `key_max_sync_cost` is of `max_queue`."""
    key_max_stored_jobs: int = Field(1000, ge=1, le=1_000_000)
    """Most batch jobs one key may have kept at once (queued, running, or finished within `result_ttl_s`);
    beyond it `POST /v1/jobs` gets 429, so that one key cannot fill the queue's memory with results."""
    key_max_event_streams: int = Field(16, ge=1, le=100_000)
    """Most job event streams (SSE) one key may hold open at once."""
    key_max_video_sessions: int = Field(2, ge=1, le=100_000)
    """Most video sessions one key may hold at once (the gateways' rows are shared by every key)."""

    max_job_items: int = Field(1000, ge=1, le=100_000)
    """Most requests one batch job may carry."""
    max_job_queue: int = Field(10_000, ge=1)
    """Most batch-job items queued or running; beyond it `POST /v1/jobs` gets 429 with Retry-After."""
    result_ttl_s: int = Field(keys.RESULT_TTL_S, ge=60)
    """How long a job and its results are kept after their last update."""
    redis_prefix: str = Field("fewstep", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of every Redis key, so that several deployments may share one Redis."""
    embedded_workers: int = Field(1, ge=0, le=64)
    """Engine worker threads inside the gateway (1 with the embedded queue, 0 with Redis); more share one engine."""
    interactive_workers: int = Field(1, ge=0, le=64)
    """Engine worker threads that take only the interactive lane (synchronous requests), beside the general
    ones, in every process that runs workers: a batch job that fills the general workers' running batch
    never makes a synchronous request wait for its steps. 0: the general workers serve both lanes."""
    claim_idle_s: float = Field(keys.CLAIM_IDLE_S, gt=0.0)
    """An item in flight this long without a heartbeat is taken back from its worker."""
    heartbeat_s: float = Field(keys.HEARTBEAT_S, gt=0.0)
    """How often workers refresh their in-flight items; must be well under `claim_idle_s`."""
    max_deliveries: int = Field(keys.MAX_DELIVERIES, ge=1, le=100)
    """An item handed out this many times without a result goes to the dead-letter stream."""
    sse_keepalive_s: float = Field(15.0, gt=0.0)
    """Idle interval after which the job event stream sends a comment, so proxies keep it open."""

    watch_interval_s: float = Field(1.0, gt=0.0, le=3600.0)
    """How often serving processes read the registry's pointers (Redis announcements wake them at once)."""
    gate_probe_seeds: int = Field(3, ge=1, le=64)
    """Seeds per prompt of an image model's probe set (the shapes probes: 20 prompts × this many images)."""
    gate_tolerance: float = Field(0.10, ge=0.0, le=1.0)
    """A new version is refused when one of its judge's accuracies is this far below the serving version's."""
    gate_max_frechet_rise: float = Field(0.25, ge=0.0, le=10.0)
    """A new version is refused when its judge's Fréchet distance to real data is more than this share above the
    serving version's (0.25: 25 % higher). Measured on the shipped student's 60 probes: a `fewstep trainer`
    round +8 %, its weights with noise at a quarter of what trips the accuracy rule +44 %."""
    gate_min_agreement_db: float = Field(9.0, ge=0.0, le=100.0)
    """A new version of a model with no judge is refused when its probe outputs are further than this (PSNR,
    dB) from the serving version's."""
    gate_timeout_s: float = Field(900.0, gt=0.0, le=86_400.0)
    """Longest the gate's probes may take (the candidate's and, where needed, the serving version's): past it
    the version is refused, recorded, so a manifest that makes every item slow never holds the loader."""
    max_load_attempts: int = Field(3, ge=1, le=100)
    """A version whose load was cut short (its process died) this many times is refused."""
    canary_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of new items a gated version serves before it takes all traffic (0: swap at once)."""
    canary_items: int = Field(50, ge=1)
    """Items a canary serves before it is promoted (or refused on its error rate)."""
    canary_max_error_rate: float = Field(0.02, ge=0.0, le=1.0)
    """A canary whose failed-item rate is above this is refused and the serving version keeps all traffic."""
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys for `/v1/admin/*` (rollback). Unset: the admin routes answer 403 (they are never open)."""

    video_max_sessions: int = Field(4, ge=0, le=1024)
    """Concurrent video streams per gateway process (rows of each video model's KV cache); 0 serves no video."""
    video_max_frames: int = Field(4096, ge=1, le=1_000_000)
    """Most frames one WebSocket stream may ask for (`frames`)."""
    video_target_fps: float = Field(8.0, gt=0.0, le=1000.0)
    """The frame rate streams are meant to keep up; slower frames are counted as late in the metrics."""
    video_buffer_frames: int = Field(8, ge=1, le=1024)
    """Frames made ahead of a client that reads slowly; beyond it its session waits (backpressure)."""
    video_first_message_s: float = Field(10.0, gt=0.0, le=3600.0)
    """How long a new WebSocket may take to send its first message before it is closed (1008)."""
    ws_max_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest WebSocket message a client may send (a start or a prompt change is well under 1 KiB);
    bigger ones close the socket with 1009 before they are parsed. Per-message compression is off, so
    a small frame cannot inflate past this."""
    realtime_max_frame_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Largest frame (one binary message: a JPEG, PNG or WebP) a client may send on `WS /v1/images/stream`; a
    bigger one closes the socket with 1009. The WebSocket layer takes messages up to the larger of this and
    `ws_max_bytes`; text messages on any socket stay bounded by `ws_max_bytes`."""
    realtime_max_session_s: float = Field(900.0, gt=0.0, le=86_400.0)
    """Longest a real-time image session may last; then it is closed 1008."""
    key_max_realtime_sessions: int = Field(2, ge=1, le=100_000)
    """Real-time image sessions (`WS /v1/images/stream`) one key may hold open at once, across gateways."""
    ws_first_message_bytes: int = Field(4096, ge=256, le=1024 * 1024)
    """Largest first message of a WebSocket that sent no Authorization header (its key is in it): an
    unauthenticated client gets no more than this read and parsed."""
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated browser origins (`https://app.example`) whose pages may open video WebSockets besides
    the gateway's own (the playground); `*` allows any. Clients that send no Origin are not browsers: the key
    guards them."""
    video_max_session_s: float = Field(900.0, gt=0.0, le=86_400.0)
    """Longest a video session may last; a slower one (a client that reads slowly holds a row) is closed 1008."""
    video_prompt_changes_per_s: float = Field(2.0, gt=0.0, le=1000.0)
    """Sustained rate of mid-stream prompt changes per key; beyond it and its burst the session is closed 1013."""
    video_prompt_change_burst: int = Field(10, ge=1, le=10_000)
    """Prompt changes a key may send at once before `video_prompt_changes_per_s` applies."""
    video_backend: Literal["torch", "onnxruntime", "openvino"] = "torch"
    """Backend of the video engines (onnxruntime runs the graphs `fewstep export` writes; openvino, their IR from
    `fewstep export --openvino`)."""
    video_gate_streams: int = Field(8, ge=0, le=64)
    """Probe streams a new video version must pass before it takes sessions (`service/gate.py`); 0: no gate."""
    video_gate_frames: int = Field(16, ge=2, le=256)
    """Frames per video probe stream."""
    video_max_queue: int = Field(64, ge=1, le=100_000)
    """Most videos (`POST /v1/videos`) queued or running at once across the deployment (the video lane's depth);
    beyond it a new one is refused with 429."""
    video_max_clips: int = Field(2, ge=0, le=1024)
    """Videos one gateway makes at once, each a session on a row of `video_max_sessions` (shared with
    WebSocket streams); 0: this gateway makes none (another one does)."""
    video_fps: float = Field(8.0, gt=0.0, le=240.0)
    """Frame rate of a video model whose manifest names none (the shipped toy student): `seconds` × this is the
    clip's frame count, and its MP4 plays at it."""
    video_max_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    """Largest MP4 a video may make; a bigger one fails the video (its error names this limit) and is not stored."""
    video_crf: int = Field(18, ge=0, le=51)
    """H.264 constant rate factor of the MP4s (0: lossless luma; 18: visually lossless; higher: smaller files)."""
    video_poll_after_ms: int = Field(250, ge=10, le=60_000)
    """How soon a client should look at an unfinished video again, sent as `openai-poll-after-ms` (the header the
    OpenAI SDK's `poll` and `create_and_poll` follow; without it they wait 1 s between looks)."""

    webhook_secret: SecretStr | None = None
    """Master key of the webhooks' signatures: each API key's signing secret is derived from it (HMAC-SHA256 of the
    key's id) and read by that key at `GET /v1/webhooks/secret`. Unset: `webhook_url` is refused. Every gateway
    of a deployment needs the same value (a Kubernetes Secret)."""
    webhook_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated host names a `webhook_url` may name: `hooks.example.com`, or `*.example.com` for its
    subdomains. Empty: webhooks are refused."""
    webhook_allow_private: bool = False
    """Whether a webhook may go to a private, loopback, link-local or otherwise non-public address. Off: the
    host's every resolved address must be public, and the delivery connects to the address checked (no second
    lookup a DNS rebinding could answer differently)."""
    webhook_max_url_chars: int = Field(2048, ge=32, le=16_384)
    """Longest `webhook_url`."""
    webhook_timeout_s: float = Field(10.0, ge=0.5, le=120.0)
    """One delivery attempt's limit (connect, send, answer); no redirect is followed."""
    webhook_backoff_s: float = Field(2.0, ge=0.05, le=3600.0)
    """Wait before the first retry of a failed delivery; doubled each attempt up to `webhook_backoff_max_s`, each
    wait drawn between half and the whole of it (jitter)."""
    webhook_backoff_max_s: float = Field(600.0, ge=0.05, le=86_400.0)
    """Longest wait between two attempts."""
    webhook_retry_for_s: float = Field(86_400.0, ge=1.0, le=7 * 86_400.0)
    """A delivery is retried for this long after its job finished, then given up (counted and logged)."""

    playground: bool = True
    """Serve the playground page at `/` (static files; every API call it makes carries the key as usual)."""

    log_level: str = "info"
    """Python logging level of the gateway."""

    @field_validator("api_keys", "admin_keys", "ws_allowed_origins", "allowed_hosts", "webhook_hosts", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _sides_in_order(self) -> Settings:
        if self.image_min_side > self.image_max_side:
            raise ValueError(
                f"FEWSTEP_IMAGE_MIN_SIDE must be at most FEWSTEP_IMAGE_MAX_SIDE ({self.image_max_side}). "
                f"Given: {self.image_min_side}"
            )
        return self

    @model_validator(mode="after")
    def _keys_long_enough(self) -> Settings:
        for name, given in (("FEWSTEP_API_KEYS", self.api_keys), ("FEWSTEP_ADMIN_KEYS", self.admin_keys)):
            for key in given:
                if len(key.get_secret_value()) < self.min_key_chars:
                    raise ValueError(
                        f"{name} has a key of {len(key.get_secret_value())} characters; keys must have at least "
                        f"{self.min_key_chars} (`min_key_chars`)"
                    )
        return self

    @model_validator(mode="after")
    def _key_caps_leave_room(self) -> Settings:
        """A key's cap is at most half its lane: refused when set larger, lowered when left at its default."""
        for cap, lane in (("key_max_sync_cost", "max_queue"), ("key_max_job_cost", "max_job_queue")):
            half = max(1, getattr(self, lane) // 2)
            if getattr(self, cap) > half:
                if cap in self.model_fields_set:
                    raise ValueError(
                        f"FEWSTEP_{cap.upper()} must be at most half of FEWSTEP_{lane.upper()} ({half}), so that one "
                        f"key leaves room for the others. Given: {getattr(self, cap)}"
                    )
                setattr(self, cap, half)
        return self

    @model_validator(mode="after")
    def _redis_moves_the_engines_out(self) -> Settings:
        if "embedded_workers" not in self.model_fields_set and self.redis_url is not None:
            self.embedded_workers = 0  # with Redis, `fewstep worker` processes do the work
        return self

    @model_validator(mode="after")
    def _heartbeat_within_claim_idle(self) -> Settings:
        if self.heartbeat_s * 2 > self.claim_idle_s:
            raise ValueError(
                f"FEWSTEP_HEARTBEAT_S must be at most half of FEWSTEP_CLAIM_IDLE_S ({self.claim_idle_s}). "
                f"Given: {self.heartbeat_s}"
            )
        return self

    def trusted_hosts(self, keyed: bool) -> list[str]:
        """The `Host` names the `/v1/` routes answer (`allowed_hosts`, or its default); ["*"]: any."""
        if self.allowed_hosts:
            return self.allowed_hosts
        if keyed or self.host not in LOOPBACK_HOSTS:
            return ["*"]
        return list(LOOPBACK_HOSTS)

    def engine_threads(self, general: int) -> int:
        """Threads that run engines in a process with `general` general workers (its interactive ones join
        them; a process with no general worker runs none)."""
        return general + self.interactive_workers if general else 0

    def intra_op_threads(self, engine_threads: int) -> int:
        """Intra-op threads for each of `engine_threads` concurrent engine threads: `threads` when set, else
        the cores shared out, so that the teams together never oversubscribe them."""
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, engine_threads))

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_old_name(cls, v: object) -> object:
        return "registry" if v == "image" else v  # `image` served imported pipelines too: the name said less

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v: str) -> str:
        if v not in ("fp32", "fp16", "int8", "int8-dynamic", "fp8"):
            raise ValueError(f"FEWSTEP_PRECISION must be fp32, fp16, int8, int8-dynamic or fp8. Given: {v!r}")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("torch", "onnxruntime", "openvino", "tensorrt"):
            raise ValueError(f"FEWSTEP_BACKEND must be torch, onnxruntime, openvino or tensorrt. Given: {v!r}")
        return v


def configuration_markdown() -> str:
    """docs/configuration.md: every setting, its default, its bounds and what it means, from this class (the
    docstring under each field). `python -m fewstep.service.settings > docs/configuration.md` writes it;
    tests/service/test_settings.py checks it is current."""
    lines = [
        "# Configuration",
        "",
        "Every setting of every fewstep process: environment variables with the `FEWSTEP_` prefix, read once at",
        "start by one class (`fewstep/service/settings.py`) and validated there: a bad value stops the process",
        "with the variable's name. Lists are comma-separated. This page is generated from that class",
        "(`python -m fewstep.service.settings > docs/configuration.md`); a test keeps it current.",
        "",
        "| variable | default | bounds | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None or default == [] else f"`{default}`"
        bounds = ", ".join(
            f"{op} {getattr(m, attr)}"
            for m in field.metadata
            for attr, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("pattern", "matching"))
            if getattr(m, attr, None) is not None
        )
        annotation = str(field.annotation).replace("typing.", "")
        if "Literal" in annotation:
            bounds = " or ".join(f"`{v}`" for v in field.annotation.__args__)  # type: ignore[union-attr]
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        bounds = bounds.replace("|", "\\|")
        lines.append(f"| `FEWSTEP_{name.upper()}` | {shown} | {bounds} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
