# Per-stream view of the late-frame failures: 128 held-out streams (the model card's prompts, seeds and image
# first frames, extended) of 256 frames at 2 steps; frames 241-256 by shape, radius and speed, and the frame at
# which each failing stream first went wrong. Usage: python many_streams.py N FOLDER [FOLDER ...]
import sys
from pathlib import Path

import numpy as np
import torch

from fewstep.engines.image import ImageEngine
from fewstep.models.checkpoint import read_manifest
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import frame_noise, student_stream
from fewstep.trainer import video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net
from fewstep.trainer.video_eval import SEED_BASE, eval_prompts, image_first_frames, load_judge

torch.set_num_threads(2)
ck = Path("checkpoints")
r = VideoRecipe(eval_streams=int(sys.argv[1]))
enc = TextEncoder()
targets, prompts = eval_prompts(r)
seeds = [SEED_BASE + i for i in range(len(prompts))]
image = ImageEngine(ck / "shapes", enc)
image.load()
first = image_first_frames(image, prompts, seeds, 2, 16)
judge = load_judge(ck / "shapes-video-judge")
sched = FewStepSchedule.from_dict(read_manifest(ck / "shapes-video")["schedule"])
for name in sys.argv[2:]:
    net = load_video_net(Path(name))
    with torch.inference_mode():
        v = student_stream(
            net,
            net.text_kv(*enc.encode(prompts)),
            sched,
            2,
            256,
            lambda f, k: frame_noise(seeds, f, k, net.cfg),
            first=first,
        ).numpy()
    s = video_judge.score_streams(judge, v, targets)
    print(name, "1-16", s.window(0, 16)["joint"], "241-256", s.window(240, 256)["joint"])
    late = (s.shape & s.colour)[:, 240:].mean(1)
    bad = late < 0.5
    print(" streams failing late:", int(bad.sum()), "of", len(late))
    for shp in ("circle", "square", "triangle", "cross"):
        m = np.array([t.scene.shape == shp for t in targets])
        print(f"  {shp:8s} n={m.sum():3d} late joint {late[m].mean():.3f}")
    rad = np.array([t.scene.radius for t in targets])
    for lo, hi in ((6, 7.5), (7.5, 9), (9, 11.1)):
        m = (rad >= lo) & (rad < hi)
        print(f"  radius {lo}-{hi} n={m.sum():3d} late joint {late[m].mean():.3f}")
    for sp in ("slowly", "quickly"):
        m = np.array([t.speed == sp for t in targets])
        print(f"  {sp:8s} n={m.sum():3d} late joint {late[m].mean():.3f}")
    # when does a failing stream first go wrong for good?
    j = s.shape & s.colour
    onset = [int(np.max(np.nonzero(j[i])[0], initial=-1)) for i in np.nonzero(bad)[0]]
    first_wrong = [int(np.argmax(~j[i, 1:]) + 1) for i in np.nonzero(bad)[0]]
    print("  failing streams: first wrong frame", sorted(first_wrong))
