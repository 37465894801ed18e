"""Every setting and limit of the service: one pydantic-settings class, `FEWSTEP_` prefix.

Instantiated once per process (`Settings()`), then passed down. Each field's default is
validated at start-up, so a bad environment fails fast with the variable's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface the gateway binds to."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port of the gateway."""
    registry: Path = Path("var/registry")
    """Registry root (a volume on Kubernetes)."""
    checkpoints: Path = Path("checkpoints")
    """Shipped checkpoints that seed an empty registry on start."""
    backend: str = "torch"
    """Engine backend for every model (torch; onnxruntime and tensorrt come with the exporters)."""
    precision: str = "fp32"
    """Numeric precision of the backend."""
    threads: int = Field(2, ge=1, le=256)
    """torch / ONNX Runtime intra-op threads. Oversubscribed threads slow a 2-core machine by 100×."""

    redis_url: SecretStr | None = None
    """Redis URL; unset → the embedded in-process queue."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys; empty → no authentication (logged as a warning)."""

    max_n: int = Field(8, ge=1, le=256)
    """Most images one request may ask for (`n`)."""
    max_prompt_chars: int = Field(500, ge=1, le=100_000)
    """Longest prompt, in characters (the text encoder reads its first 16 tokens)."""
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    """Largest request body; bigger bodies get 413 before they are read."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Most items one engine call runs."""
    batch_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    """How long a lone item waits for company before running alone."""
    max_queue: int = Field(256, ge=1)
    """Most items waiting per model; beyond it requests get 429 with Retry-After."""
    request_timeout_s: float = Field(120.0, gt=0.0)
    """A synchronous request that waits longer than this fails with 503."""

    log_level: str = "info"
    """Python logging level of the gateway."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v: str) -> str:
        if v not in ("fp32", "fp16", "int8", "int8-dynamic", "fp8"):
            raise ValueError(f"FEWSTEP_PRECISION must be fp32, fp16, int8, int8-dynamic or fp8. Given: {v!r}")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in ("torch", "onnxruntime", "tensorrt"):
            raise ValueError(f"FEWSTEP_BACKEND must be torch, onnxruntime or tensorrt. Given: {v!r}")
        return v
