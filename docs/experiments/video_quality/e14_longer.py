# E14: more self-forcing on the shipped student, on longer rollouts (16 growing to 24 frames, loss on every
# frame, lr 1e-4, 400 steps), then its streams from the image student's first frame at 2 steps, judged as
# the model card judges them. Does the late-frame shape keep improving with longer short-rollout training?
import time
from dataclasses import replace
from pathlib import Path

import torch

from fewstep.engines.image import ImageEngine
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.text import TextEncoder
from fewstep.models.video import frame_noise, student_stream
from fewstep.trainer import video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net, train_student
from fewstep.trainer.video_eval import SEED_BASE, eval_prompts, image_first_frames, load_judge

torch.set_num_threads(2)
ck = Path("checkpoints")
r = replace(VideoRecipe(), frames=16, self_forcing_frames=24, student_lr=1e-4, self_forcing_steps=400)
enc = TextEncoder()
t0 = time.time()
net, losses = train_student(r, enc, load_video_net(ck / "shapes-video"), r.self_forcing_steps, "E14 self-forcing")
print(f"trained in {time.time() - t0:.0f}s", flush=True)
judge = load_judge(ck / "shapes-video-judge")
targets, prompts = eval_prompts(r)
seeds = [SEED_BASE + i for i in range(len(targets))]
image = ImageEngine(ck / "shapes", enc)
image.load()
first = image_first_frames(image, prompts, seeds, 2, r.size)
schedule = FewStepSchedule.from_dict(__import__("json").loads((ck / "shapes-video/manifest.json").read_text())["schedule"])
with torch.inference_mode():
    text = net.text_kv(*enc.encode(prompts))
    v = student_stream(net, text, schedule, 2, 256, lambda f, k: frame_noise(seeds, f, k, net.cfg), first=first).numpy()
s = video_judge.score_streams(judge, v, targets)
print("E14 2 steps: 1-16", s.window(0, 16), "241-256", s.window(240, 256), flush=True)
