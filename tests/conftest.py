"""Shared fixtures: free ports, a real `fewstep serve` process, the shipped checkpoints.

Every process a test starts gets one intra-op thread: on a 2-core machine oversubscribed
OpenMP threads slow everything down by orders of magnitude.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from fewstep.exporters.onnx import export_onnx
from fewstep.models.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(os.environ.get("FEWSTEP_TEST_CHECKPOINTS", ROOT / "checkpoints"))

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    registry: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


IMAGE_ONLY = {"FEWSTEP_VIDEO_MAX_SESSIONS": "0"}
"""Server settings for tests about images: no video model is loaded (its engine, first-frame UNet and gate
take ~10 s of a server's start on these 2 cores)."""


def start_server(
    tmp: Path,
    env_extra: dict[str, str] | None = None,
    wait_ready: bool = True,
    checkpoints: Path = CHECKPOINTS,
    command: list[str] | None = None,
) -> Server:
    """`fewstep serve` (or `command` standing in for it) in a subprocess on a free port with its own
    registry under `tmp`."""
    port = free_port()
    registry = tmp / "registry"
    log = tmp / f"server-{port}.log"
    env = {
        **os.environ,
        "FEWSTEP_PORT": str(port),
        "FEWSTEP_REGISTRY": str(registry),
        "FEWSTEP_CHECKPOINTS": str(checkpoints),
        "FEWSTEP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "fewstep.cli", "serve"],
            env=env,
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, registry, log)
    deadline = time.monotonic() + 120
    path = "/readyz" if wait_ready else "/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not up after 120 s:\n{server.output()}")


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(
    tmp: Path, env: dict[str, str], name: str, engine: str = "noop", step_ms: float = 0.0, script: str | None = None
) -> WorkerProc:
    """`fewstep worker` (or a test script standing in for it) in a subprocess, one thread."""
    log = tmp / f"worker-{name}-{time.monotonic_ns()}.log"
    full = {**os.environ, "FEWSTEP_THREADS": "1", "OMP_NUM_THREADS": "1", **env}
    if script is None:
        cmd = [sys.executable, "-m", "fewstep.cli", "worker", "--engine", engine, "--name", name]
        cmd += ["--noop-step-ms", str(step_ms)]
    else:
        cmd = [sys.executable, "-P", script, name, str(step_ms)]  # -P: its folder must not shadow stdlib `queue`
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=full, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    return WorkerProc(name, proc, log)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (graceful shutdown), SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_worker(w: WorkerProc) -> None:
    terminate(w.proc)


def stop_server(server: Server) -> None:
    terminate(server.proc)


class RedisServer:
    """A real `redis-server` on a free port, AOF on, data under `dir`; can be restarted in place."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: `make test` installs it"
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def checkpoints() -> Path:
    assert (CHECKPOINTS / "shapes" / "manifest.json").is_file(), "run `make train` to produce checkpoints/"
    return CHECKPOINTS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoints: Path) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def encoder():  # type: ignore[no-untyped-def]
    from fewstep.models.text import TextEncoder

    return TextEncoder()


@pytest.fixture
def student_copy(tmp_path: Path, checkpoints: Path) -> Path:
    """A private copy of the shipped student, safe to corrupt."""
    dst = tmp_path / "shapes"
    shutil.copytree(checkpoints / "shapes", dst)
    return dst


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoints: Path, encoder) -> Registry:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path_factory.mktemp("onnx") / "registry")
    reg.seed_from(checkpoints)
    export_onnx(reg.version_dir("shapes", "1"), encoder)
    export_onnx(reg.version_dir("shapes-teacher", "1"), encoder)
    return reg


@pytest.fixture(scope="session")
def quantized(exported: Registry, checkpoints: Path, encoder) -> Registry:  # type: ignore[no-untyped-def]
    """`exported`, plus every quantized artifact (student gated by the classifier, teacher by its error)."""
    from fewstep.artifacts.onnx import QUANTIZED
    from fewstep.evaluation.classifier import load_classifier
    from fewstep.evaluation.judges import AttributeJudge
    from fewstep.exporters.quantize import quantize

    judge = AttributeJudge(load_classifier(checkpoints / "shapes-classifier"))
    # 40 gate images per step count (the exporter's default is 160): a quarter of the judging (FP8's emulated
    # QDQ is the slowest part of the session's set-up), and the same seeds for FP32 and each precision keep
    # the comparison paired. Measured at 40: joint 1.000 and Fréchet within 3 % of FP32's for every precision.
    quantize(exported.version_dir("shapes", "1"), QUANTIZED, encoder, judge, gate_seeds=1)
    quantize(exported.version_dir("shapes-teacher", "1"), QUANTIZED, encoder)
    return exported


@pytest.fixture(scope="session")
def openvino_exported(quantized: Registry, checkpoints: Path, encoder) -> Registry:  # type: ignore[no-untyped-def]
    """`quantized`, plus the OpenVINO IR of the student and its teacher, FP32 and INT8 (NNCF): the student's INT8
    gated by the classifier on 40 images per step count, as `quantized` gates ONNX Runtime's."""
    from fewstep.evaluation.classifier import load_classifier
    from fewstep.evaluation.judges import AttributeJudge
    from fewstep.exporters.openvino import export_openvino

    judge = AttributeJudge(load_classifier(checkpoints / "shapes-classifier"))
    export_openvino(quantized.version_dir("shapes", "1"), encoder, ("fp32", "int8"), judge, gate_seeds=1)
    export_openvino(quantized.version_dir("shapes-teacher", "1"), encoder, ("fp32", "int8"))
    return quantized


@pytest.fixture(scope="session")
def video_student(checkpoints: Path) -> Path:
    """The shipped video student (`fewstep train video`)."""
    folder = checkpoints / "shapes-video"
    assert (folder / "manifest.json").is_file(), "run `fewstep train video` to produce checkpoints/shapes-video"
    return folder


@pytest.fixture(scope="session")
def video_exported(tmp_path_factory: pytest.TempPathFactory, video_student: Path, encoder) -> Path:  # type: ignore[no-untyped-def]
    """The video student pushed into a fresh registry and exported there by `fewstep push` and `fewstep export
    --openvino` (once per session): its version folder, with the three ONNX graphs and `video.onnx.json`, and
    their OpenVINO IR. What the export command printed is kept beside the registry in `export.out`."""
    import contextlib
    import io

    from fewstep.cli import main

    root = tmp_path_factory.mktemp("video-onnx")
    reg = str(root / "registry")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["push", str(video_student), "--registry", reg]) == 0
        assert main(["export", "shapes-video", "--registry", reg, "--threads", "1", "--openvino"]) == 0
    (root / "export.out").write_text(out.getvalue())
    return Registry(root / "registry").version_dir("shapes-video", "1")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random diffusers pipelines saved as users save theirs: SD- and SDXL-style, each also with the
    guidance embedding of LCM students (`-lcm`), and FLUX.1-schnell-style (`flux`)."""
    from tests import pipelines

    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": pipelines.sd(root / "sd"),
        "sdxl": pipelines.sdxl(root / "sdxl"),
        "sd-lcm": pipelines.sd(root / "sd-lcm", time_cond_proj_dim=32),
        "sdxl-lcm": pipelines.sdxl(root / "sdxl-lcm", time_cond_proj_dim=32),
        "flux": pipelines.flux(root / "flux"),
    }


@pytest.fixture(scope="session")
def latent_exported(tiny_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's turbo student (tiny SD-style pipeline) imported, exported to ONNX and quantized to INT8, and the
    same as OpenVINO IR, FP32 and INT8 (NNCF)."""
    from fewstep.exporters.openvino import export_openvino
    from fewstep.exporters.pipeline_onnx import export_pipeline_onnx, quantize_pipeline
    from fewstep.models.importing import import_pipeline
    from fewstep.models.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("latent") / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "turbo", registry, family="turbo")
    folder = registry.version_dir(name, version)
    export_pipeline_onnx(folder)
    quantize_pipeline(folder, "int8")
    export_openvino(folder, None, ("fp32", "int8"))  # a pipeline brings its own text encoders
    return folder
