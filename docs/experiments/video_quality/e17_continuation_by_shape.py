# E17: the real-first-frame continuation (model card, second table) per shape, for the student before and after the
# long-rollouts stage, frames 1-16 at 2 steps. The earlier weights: `git show a09c07f:checkpoints/shapes-video/model.safetensors`
# and its manifest.json, into /tmp/oldsv/. Run from the repository root.
import json
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import frame_noise, student_stream
from fewstep.trainer import clips, video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net
from fewstep.trainer.video_eval import SEED_BASE, eval_prompts, load_judge
r = VideoRecipe(); enc = TextEncoder()
judge = load_judge(Path("checkpoints/shapes-video-judge"))
targets, prompts = eval_prompts(r)
seeds = [SEED_BASE + i for i in range(len(targets))]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, 64, rng, r.size) for c in targets])
first = torch.from_numpy(real[:, 0])
states, mask = enc.encode(prompts)
sched = FewStepSchedule.from_dict(json.loads(Path("checkpoints/shapes-video/manifest.json").read_text())["schedule"])
for name, folder in (("old", "/tmp/oldsv"), ("new", "checkpoints/shapes-video")):
    net = load_video_net(Path(folder))
    with torch.inference_mode():
        v = student_stream(net, net.text_kv(states, mask), sched, 2, 64, lambda f, k: frame_noise(seeds, f, k, net.cfg), first=first).numpy()
    s = video_judge.score_streams(judge, v, targets)
    joint = (s.shape & s.colour)[:, 1:17].mean(1)
    by = {}
    for c, j in zip(targets, joint): by.setdefault(c.scene.shape, []).append(j)
    print(name, "frames 1-16 joint", joint.mean().round(3), {k: (round(float(np.mean(v)), 3), len(v)) for k, v in by.items()},
          "radius of failing", sorted(round(c.scene.radius, 1) for c, j in zip(targets, joint) if j < 0.9))
