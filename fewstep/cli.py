"""The `fewstep` command: serve, worker, train, trainer, import, export, push, rollback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _threads(n: int | None) -> int:
    """Thread count from the flag or FEWSTEP_THREADS, exported before torch is imported."""
    count = n or int(os.environ.get("FEWSTEP_THREADS", "2"))
    os.environ["FEWSTEP_THREADS"] = str(count)
    os.environ.setdefault("OMP_NUM_THREADS", str(count))
    return count


def _settings(**flags: Any) -> Any:
    """The service's `Settings`: the FEWSTEP_ environment, with the flags given on the command line over it
    (as arguments, not by writing the environment)."""
    from fewstep.service.settings import Settings

    return Settings(**{name: value for name, value in flags.items() if value is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(threads=args.threads, host=args.host, port=args.port)
    from fewstep.service.server import serve

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def _needs(extra: str, *modules: str) -> None:
    """Exit with the extra to install when a role's packages are missing (a plain install only serves)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"fewstep: {', '.join(missing)} missing: pip install 'fewstep[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def cmd_train(args: argparse.Namespace) -> int:
    _needs("train", "matplotlib")
    threads = _threads(args.threads)
    if args.what == "video":
        from fewstep.trainer import stages as st
        from fewstep.trainer import video

        stages = args.stages.split(",") if args.stages else list(st.VIDEO_STAGES)
        vrecipe = st.VideoRecipe.quick() if args.quick else st.VideoRecipe()
        vrecipe.seed = args.seed
        video.run(stages, Path(args.out), Path(args.docs), vrecipe, threads)
        if args.push:
            # The image student that draws frame 0 first (by sha256, once): a gateway refuses a video
            # student whose image model the registry lacks. The judge before the student it judges.
            _push_once(Path(args.out) / st.STUDENT_DIR, args.registry)
            for folder in (st.VIDEO_JUDGE_DIR, st.VIDEO_TEACHER_DIR, st.VIDEO_STUDENT_DIR):
                if (Path(args.out) / folder / "manifest.json").is_file():
                    _push(Path(args.out) / folder, args.registry)
        return 0
    from fewstep.trainer import stages as st
    from fewstep.trainer.image import run

    stages = args.stages.split(",") if args.stages else list(st.IMAGE_STAGES)
    recipe = st.ImageRecipe.quick() if args.quick else st.ImageRecipe()
    recipe.seed = args.seed
    run(stages, Path(args.out), Path(args.docs), recipe, threads)
    if args.push:
        # Judge and teacher first: a serving process gates the student with the one and needs the other.
        for folder in (st.CLASSIFIER_DIR, st.TEACHER_DIR, st.STUDENT_DIR):
            if (Path(args.out) / folder / "manifest.json").is_file():
                _push(Path(args.out) / folder, args.registry)
    return 0


def _push_once(folder: Path, registry_root: str | None) -> None:
    """`_push` unless the registry already holds these exact weights (under the folder's model name)."""
    from fewstep.models.checkpoint import WEIGHTS, read_manifest
    from fewstep.models.registry import Registry
    from fewstep.service.settings import Settings

    manifest = read_manifest(folder)
    registry = Registry(Path(registry_root) if registry_root else Settings().registry)
    held = registry.find(manifest["name"], manifest["files"][WEIGHTS]["sha256"])
    if held is None:
        _push(folder, registry_root)
    else:
        print(f"{manifest['name']}:{held} already holds {folder.name}'s weights", flush=True)


def _push(
    folder: Path, registry_root: str | None, model: str | None = None, version: str | None = None, promote: bool = True
) -> str:
    """Publish a checkpoint folder (and promote it), announce it when it is promoted; returns the version."""
    from fewstep.models.registry import Registry
    from fewstep.service.settings import Settings
    from fewstep.service.watch import announce

    settings = Settings()
    registry = Registry(Path(registry_root) if registry_root else settings.registry)
    model, version = registry.publish(folder, model, version, promote=promote)
    promoted = registry.promoted(model)
    heard = announce(settings, model, version, "push") if promoted == version else 0
    print(f"published {model}:{version} (promoted: {promoted}; announced to {heard} subscribers)", flush=True)
    return version


def cmd_trainer(args: argparse.Namespace) -> int:
    _needs("train", "matplotlib")
    threads = _threads(args.threads)
    import torch

    from fewstep.models.registry import Registry
    from fewstep.service.settings import Settings
    from fewstep.trainer.companion import CompanionRecipe, run_trainer
    from fewstep.trainer.progress import heartbeat_to

    torch.set_num_threads(threads)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    heartbeat_to(Path(args.heartbeat) if args.heartbeat else None)
    registry = Registry(Path(args.registry) if args.registry else Settings().registry)
    recipe = CompanionRecipe(
        pairs=args.pairs,
        pair_sampler_steps=args.pair_sampler_steps,
        steps=args.steps,
        minutes=args.minutes,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
    )
    run_trainer(
        registry,
        args.model,
        recipe,
        args.rounds,
        lambda folder: _push(folder, args.registry, args.model),
        Path(args.work),
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fewstep.models.anyflow_far import FAR_FAMILY, FAR_PIPELINES
    from fewstep.models.causal_families import CAUSAL_FAMILIES
    from fewstep.models.importing import (
        import_causal_video,
        import_clip_video,
        import_far,
        import_pipeline,
        pipeline_class,
    )
    from fewstep.models.registry import Registry
    from fewstep.models.wan_clip import CLIP_FAMILIES
    from fewstep.service.settings import Settings
    from fewstep.service.watch import announce

    settings = Settings()
    registry = Registry(Path(args.registry) if args.registry else settings.registry)
    if args.family == FAR_FAMILY or (args.family is None and pipeline_class(Path(args.path)) in FAR_PIPELINES):
        flags = ("unet", "teacher", "handoff", "lora", "lora_scale", "lora_alpha", "student", "which", "max_frames")
        _not_taken(args, (*flags, "frames"), f"an AnyFlow FAR pipeline ({FAR_FAMILY})")
        model, version = import_far(
            Path(args.path),
            args.name,
            registry,
            size=_size(args.size) if args.size else None,
            steps=[int(n) for n in args.steps.split(",")] if args.steps else None,
        )
    elif args.family in CLIP_FAMILIES:
        _not_taken(
            args,
            ("unet", "steps", "teacher", "handoff", "student", "which", "max_frames", "lora_alpha"),
            f"a clip family ({args.family})",
        )
        model, version = import_clip_video(
            Path(args.path),
            args.name,
            registry,
            args.family,
            lora=Path(args.lora) if args.lora else None,
            lora_scale=1.0 if args.lora_scale is None else args.lora_scale,
            size=_size(args.size) if args.size else None,
            frames=args.frames,
        )
    elif args.family in CAUSAL_FAMILIES:
        _not_taken(
            args, ("unet", "steps", "teacher", "handoff", "lora_scale", "frames"), f"a causal family ({args.family})"
        )
        model, version = import_causal_video(
            Path(args.path),
            args.name,
            registry,
            args.family,
            student=Path(args.student) if args.student else None,
            convert_pickle=args.convert_pickle,
            which=args.which or "ema",
            size=_size(args.size) if args.size else None,
            max_frames=args.max_frames,
            lora=Path(args.lora) if args.lora else None,
            lora_alpha=args.lora_alpha,
        )
    else:
        _not_taken(args, ("student", "which", "size", "max_frames", "frames", "lora_alpha"), "an image family")
        model, version = import_pipeline(
            Path(args.path),
            args.name,
            registry,
            family=args.family,
            unet=Path(args.unet) if args.unet else None,
            teacher=args.teacher,
            convert_pickle=args.convert_pickle,
            steps=[int(n) for n in args.steps.split(",")] if args.steps else None,
            handoff=args.handoff,
            teacher_guidance=args.teacher_guidance,
            lora=Path(args.lora) if args.lora else None,
            lora_scale=1.0 if args.lora_scale is None else args.lora_scale,
        )
    manifest = registry.manifest(model, version)
    heard = announce(settings, model, version, "push")
    print(
        f"imported {model}:{version} ({manifest['pipeline']['class']}, {_described(manifest)}; "
        f"announced to {heard} subscribers)",
        flush=True,
    )
    return 0


def _described(manifest: dict[str, Any]) -> str:
    """What an imported version serves, in a few words."""
    if "clip" in manifest:
        video = manifest["video"]
        longest = 1 + video["latent"]["temporal"] * (video["max_frames"] - 1)
        return f"clip family {manifest['clip']['name']}, {video['width']}x{video['height']}, up to {longest} frames"
    if "causal" in manifest:
        video = manifest["video"]
        frame = f"{video['width']}x{video['height']}"
        return f"causal family {manifest['causal']['name']}, {frame}, up to {video['max_frames']} latent frames"
    recipe = manifest.get("recipe") or {}
    what = (
        f"family {recipe.get('family')}, steps {sorted(int(k) for k in recipe.get('timesteps', {}))}"
        if recipe
        else "a teacher"
    )
    return f"{what}, native {manifest['native_size']}"


def _not_taken(args: argparse.Namespace, flags: tuple[str, ...], what: str) -> None:
    """CheckpointError naming the flags given that `what` does not take (they would be silently ignored)."""
    from fewstep.errors import CheckpointError

    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if given:
        raise CheckpointError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not taken by {what}")


def _size(text: str) -> tuple[int, int]:
    """`--size WxH` as (width, height)."""
    from fewstep.errors import CheckpointError

    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise CheckpointError(f"--size must be WIDTHxHEIGHT in pixels (832x480). Given: {text[:40]}")
    return int(width), int(height)


def cmd_push(args: argparse.Namespace) -> int:
    _push(Path(args.dir), args.registry, args.model, args.version, args.promote)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from fewstep.models.registry import Registry
    from fewstep.service.kinds import runtime_of
    from fewstep.service.settings import Settings
    from fewstep.service.watch import announce

    settings = Settings()
    registry = Registry(Path(args.registry) if args.registry else settings.registry)
    version = registry.rollback(args.model, args.to, runtime_of(registry, settings, args.model))
    heard = announce(settings, args.model, version, "rollback")
    print(f"{args.model} now points at version {version} (announced to {heard} subscribers)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _needs("export", "onnx", "onnxruntime", "onnxscript")
    _threads(args.threads)
    from fewstep.evaluation.judges import load_judge
    from fewstep.exporters.onnx import export_onnx
    from fewstep.exporters.quantize import quantize
    from fewstep.models.registry import Registry
    from fewstep.models.text import TextEncoder
    from fewstep.service.settings import Settings

    registry = Registry(Path(args.registry) if args.registry else Settings().registry)
    model, _, version = args.target.partition(":")
    version = version or registry.promoted(model) or ""
    if not version:
        print(f"fewstep export: model {model!r} has no versions in {registry.root}", file=sys.stderr)
        return 1
    if args.openvino:
        _needs("openvino", "openvino", "nncf")
    manifest = registry.validate(model, version)
    if manifest.get("kind") == "diffusers":
        folders = _export_pipeline(registry, model, version, manifest, args.precisions or "fp32,int8,int8-dynamic")
        if args.openvino:
            _export_openvino(folders, None, args.precisions or "fp32,int8", None)
        return 0
    if manifest.get("kind") == "video":
        from fewstep.exporters.video_onnx import export_video_onnx

        folder = registry.version_dir(model, version)
        art = export_video_onnx(folder, TextEncoder())
        graphs = ", ".join(f"{g['file']} ({g['bytes']} bytes)" for g in art["graphs"].values())
        print(f"exported {model}:{version} → {graphs}, parity {json.dumps(art['parity'])}")
        if args.openvino:
            _export_openvino([folder], TextEncoder(), "fp32", None)
        return 0  # video runs fp32 on onnxruntime and openvino; its quantization is not built yet
    targets = [(model, version)]
    teacher = manifest.get("teacher") or {}
    if teacher.get("name") and (tv := registry.find(teacher["name"], teacher["sha256"])):
        targets.append((teacher["name"], tv))
    encoder = TextEncoder()
    judge = None
    judge_name = (manifest.get("evaluation") or {}).get("judge", "") if args.judge is None else args.judge
    if judge_name and (jv := registry.promoted(judge_name)):
        judge = load_judge(registry.version_dir(judge_name, jv), registry.validate(judge_name, jv))
    precisions = [p for p in (args.precisions or "fp32,int8,int8-dynamic,fp8").split(",") if p != "fp32"]
    for name, ver in targets:
        folder = registry.version_dir(name, ver)
        art = export_onnx(folder, encoder)
        print(
            f"exported {name}:{ver} → {art['artifact']} (opset {art['opset']}, {art['bytes']} bytes), "
            f"parity {json.dumps(art['parity'])}"
        )
        for q in quantize(folder, precisions, encoder, judge).values():
            print(
                f"quantized {name}:{ver} → {q['artifact']} ({q['bytes']} bytes), gate {json.dumps(q['gate'])}, "
                f"quality {json.dumps(q['quality'])}"
            )
    if args.openvino:
        folders = [registry.version_dir(name, ver) for name, ver in targets]
        _export_openvino(folders, encoder, args.precisions or "fp32,int8", judge)
    return 0


def _export_openvino(folders: list[Path], encoder: Any, precisions: str, judge: Any) -> None:
    """OpenVINO IR of each version's ONNX FP32 graphs, and its NNCF INT8 where `precisions` names int8."""
    from fewstep.exporters.openvino import export_openvino

    wanted = ["fp32", *(["int8"] if "int8" in precisions.split(",") else [])]
    for folder in folders:
        name, ver = folder.parent.name, folder.name
        for precision, art in export_openvino(folder, encoder, wanted, judge).items():
            what = f"parity {json.dumps(art['parity'])}" if precision == "fp32" else f"gate {json.dumps(art['gate'])}"
            print(f"exported {name}:{ver} → openvino/{precision}, {what}")


def _export_pipeline(registry: Any, model: str, version: str, manifest: dict[str, Any], precisions: str) -> list[Path]:
    """An imported pipeline (and its hybrid teacher): fp32 graphs, then each quantized UNet."""
    from fewstep.exporters.pipeline_onnx import export_pipeline_onnx, quantize_pipeline

    folders = [registry.version_dir(model, version)]
    if (teacher := registry.named_dir(manifest, "teacher")) is not None:
        folders.append(teacher)
    for folder in folders:
        name, ver = folder.parent.name, folder.name
        art = export_pipeline_onnx(folder)
        sizes = ", ".join(
            f"{role} {g['bytes'] + (g['data'] or {}).get('bytes', 0)} bytes" for role, g in art["graphs"].items()
        )
        print(f"exported {name}:{ver} → onnx/fp32 ({sizes}), parity {json.dumps(art['parity'])}")
        for precision in [p for p in precisions.split(",") if p != "fp32"]:
            q = quantize_pipeline(folder, precision)
            print(
                f"quantized {name}:{ver} → onnx/{precision}, gate {json.dumps(q['gate'])}, "
                f"quality {json.dumps(q['quality'])}"
            )
    return folders


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(threads=args.threads, engine=args.engine, noop_step_ms=args.noop_step_ms)
    from fewstep.service.worker_process import run_worker

    return run_worker(settings, args.name, args.metrics_port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    p.add_argument("--version", action="version", version=f"fewstep {metadata.version('fewstep')}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (settings from FEWSTEP_* variables)")
    s.add_argument("--host", help="bind address (FEWSTEP_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (FEWSTEP_PORT, default 8000)")
    s.add_argument("--threads", type=int, help="intra-op threads (FEWSTEP_THREADS; default: cores / engine threads)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="train reference models into checkpoint folders")
    t.add_argument("what", choices=["image", "video"])
    t.add_argument(
        "--stages",
        help="comma-separated stages (image: classifier,teacher,student,evaluate;"
        " video: judge,teacher,forcing,self-forcing,evaluate)",
    )
    t.add_argument("--out", default="checkpoints", help="where checkpoint folders go")
    t.add_argument("--docs", default="docs", help="where the model card and figures go")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int)
    t.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny step counts)")
    t.add_argument("--push", action="store_true", help="publish and promote the results into the registry")
    t.add_argument("--registry", help="registry root for --push (FEWSTEP_REGISTRY)")
    t.set_defaults(func=cmd_train)

    tr = sub.add_parser("trainer", help="companion training worker: fine-tune the promoted student, push each round")
    tr.add_argument("--model", default="shapes", help="student model in the registry")
    tr.add_argument("--rounds", type=int, default=0, help="rounds to run (0: until interrupted)")
    tr.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round (push every N steps)")
    tr.add_argument("--minutes", type=float, default=10.0, help="most minutes of training per round")
    tr.add_argument("--pairs", type=int, default=256, help="fresh teacher ODE pairs per round")
    tr.add_argument("--pair-sampler-steps", type=int, default=16, help="teacher sampler steps per pair")
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=3e-5)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--work", default="var/trainer", help="where round checkpoints are written before the push")
    tr.add_argument(
        "--heartbeat",
        default=None,
        help="a file touched while training moves (every step, every few seconds): a liveness probe checks its age",
    )
    tr.add_argument("--registry", help="registry root (FEWSTEP_REGISTRY)")
    tr.add_argument("--threads", type=int)
    tr.set_defaults(func=cmd_trainer)

    pu = sub.add_parser("push", help="publish a checkpoint folder into the registry")
    pu.add_argument("dir")
    pu.add_argument("--model", help="model name (default: the manifest's)")
    pu.add_argument("--version", help="version (default: the manifest's, or the next free number)")
    pu.add_argument(
        "--promote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="point the model at the new version, so serving processes gate and swap to it (default: yes)",
    )
    pu.add_argument("--registry", help="registry root (FEWSTEP_REGISTRY)")
    pu.set_defaults(func=cmd_push)

    im = sub.add_parser("import", help="register a user's diffusers pipeline folder as a served model")
    im.add_argument("path", help="a saved pipeline folder (model_index.json), or a hub-cache snapshot of one")
    im.add_argument("--name", required=True, help="model name in the registry")
    im.add_argument(
        "--family",
        help="few-step family (docs/serve-your-own-model.md): turbo, lightning, lcm, tcd, dmd2, hyper-sd, "
        "flux-schnell, sd35-turbo, z-image-turbo, qwen-image-lightning, flux2-klein, sana-sprint; `base` for a teacher "
        "(default: read from the pipeline's scheduler, refused when it cannot tell); a causal video student over a "
        "Wan 2.1 WanPipeline: self-forcing, causvid, longlive, rolling-forcing; a few-step clip student over one "
        "(or its distillation --lora): wan-lightning, fastwan, turbowan (rcm); an AnyFlowFARPipeline folder is read "
        "as anyflow-far",
    )
    im.add_argument("--unet", help="a student UNet file that replaces the pipeline's UNet (safetensors)")
    im.add_argument(
        "--student",
        help="causal families: the student's checkpoint (.pt or safetensors, its own layout or diffusers names) "
        "that replaces the WanPipeline's transformer (default: the pipeline's own transformer is the student)",
    )
    im.add_argument(
        "--which",
        choices=["ema", "generator"],
        help="causal families: the --student file's state to take (default ema: generator_ema where it has one)",
    )
    im.add_argument(
        "--convert-pickle",
        action="store_true",
        help="allow a pickle --unet, --student or --lora (loaded with weights_only, stored as safetensors)",
    )
    im.add_argument("--size", help="video families: the served frame WIDTHxHEIGHT in pixels (default 832x480)")
    im.add_argument("--frames", type=int, help="clip families: the longest clip in pixel frames, 1 + 4k (default 81)")
    im.add_argument(
        "--max-frames",
        type=int,
        help="causal families: the longest stream in latent frames (default 21; windowed families: the RoPE table)",
    )
    im.add_argument("--steps", help="comma-separated step counts to serve (default: the family's; anyflow-far: 1 to 8)")
    im.add_argument("--teacher", help="an imported base pipeline that shares the VAE and text encoders (hybrid)")
    im.add_argument(
        "--handoff",
        choices=["renoise", "trajectory"],
        help="the hybrid's hand-off (default: trajectory for flow pairs, renoise for UNet pairs)",
    )
    im.add_argument("--teacher-guidance", type=float, default=0.0, help="the teacher's CFG scale in the hybrid")
    im.add_argument("--lora", help="a distillation LoRA (safetensors) fused into the networks as diffusers fuses it")
    im.add_argument("--lora-scale", type=float, help="the LoRA's scale in the fusion (default 1)")
    im.add_argument(
        "--lora-alpha",
        type=float,
        help="causal families: the LoRA's `lora_alpha` (LongLive's adapter.alpha; default: its rank)",
    )
    im.add_argument("--registry", help="registry root (FEWSTEP_REGISTRY)")
    im.set_defaults(func=cmd_import)

    r = sub.add_parser("rollback", help="point a model back at an older version")
    r.add_argument("model")
    r.add_argument("--to", help="version to promote (default: the one before the current)")
    r.add_argument("--registry", help="registry root (FEWSTEP_REGISTRY)")
    r.set_defaults(func=cmd_rollback)

    e = sub.add_parser("export", help="write ONNX FP32, INT8 and FP8 artifacts into a registry version")
    e.add_argument("target", help="MODEL[:VERSION] (default version: the promoted one)")
    e.add_argument("--registry", help="registry root (FEWSTEP_REGISTRY)")
    e.add_argument("--threads", type=int)
    e.add_argument(
        "--precisions",
        help="comma-separated artifacts to write (fp32 is always written; default fp32,int8,int8-dynamic,fp8 "
        "for fewstep's models, fp32,int8,int8-dynamic for imported pipelines)",
    )
    e.add_argument(
        "--openvino",
        action="store_true",
        help="also convert the FP32 graphs to OpenVINO IR and, where --precisions names int8, quantize them to "
        "INT8 with NNCF (FEWSTEP_BACKEND=openvino serves them; needs the openvino extra)",
    )
    e.add_argument(
        "--judge",
        help="registry model that judges the quantized artifacts' quality gate (default: the one the "
        "model's manifest names; '' to skip the gate's accuracy check)",
    )
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("worker", help="run an engine worker on the Redis queue (FEWSTEP_REDIS_URL)")
    w.add_argument(
        "--engine",
        choices=["registry", "noop", "image"],
        help="FEWSTEP_ENGINE; noop: no network (benchmarks); image: the old name of registry",
    )
    w.add_argument("--noop-step-ms", type=float, help="FEWSTEP_NOOP_STEP_MS: wall time per step of the noop engine")
    w.add_argument("--name", help="consumer name (default: host-pid-random, unique per start)")
    w.add_argument("--metrics-port", type=int, default=0, help="serve this worker's /metrics on this port")
    w.add_argument("--threads", type=int, help="intra-op threads (FEWSTEP_THREADS; default: cores / engine threads)")
    w.set_defaults(func=cmd_worker)

    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from fewstep.errors import FewstepError

    try:
        return int(args.func(args))
    except FewstepError as e:
        print(f"fewstep {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
