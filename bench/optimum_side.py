"""The optimum-intel side of bench/user_pipelines.py, run in a venv of its own (optimum-intel resolves other torch,
transformers and diffusers versions than fewstep's).

Exports the pipeline folder with optimum-intel (`OVStableDiffusionPipeline.from_pretrained(..., export=True)`),
gives it the family's scheduler, then answers one JSON request per stdin line, one after another:
`{"prompt": ..., "steps": n, "seed": s}` → `{"ok": true}` once the image is made. Prints `ready` first.

    VENV/bin/python bench/optimum_side.py PIPELINE_DIR SCHEDULER OVERRIDES_JSON
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    src, scheduler, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import diffusers
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(src, export=True, compile=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config({**pipe.scheduler.config, **overrides})
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pipe(
            req["prompt"],
            num_inference_steps=req["steps"],
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(req["seed"]),
        )
        print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    main()
