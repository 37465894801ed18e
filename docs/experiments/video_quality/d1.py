import json, time, numpy as np, torch
from pathlib import Path
from fewstep.models.text import TextEncoder
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.video import frame_noise, student_stream
from fewstep.trainer import clips, video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net, sample_stream
from fewstep.trainer.video_eval import load_judge, eval_prompts
torch.set_num_threads(2)
out = Path("checkpoints"); r = VideoRecipe()
judge = load_judge(out/"shapes-video-judge")
targets, prompts = eval_prompts(r)
enc = TextEncoder(); states, mask = enc.encode(prompts)
F = 64; seeds=[5_000_000+i for i in range(len(targets))]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, F, rng, r.size) for c in targets])
def rep(name, v):
    s = video_judge.score_streams(judge, v, targets)
    print(name, "f0", s.window(0,1), "1-16", s.window(0,16), "48-64", s.window(48,64), flush=True)
rep("real", real)
sched = FewStepSchedule.from_dict(json.loads((out/"shapes-video"/"manifest.json").read_text())["schedule"])
for d in ["shapes-video", "shapes-video-forcing-only"]:
    net = load_video_net(out/d); text = net.text_kv(states, mask)
    for steps in (1,2,4):
        v = student_stream(net, text, sched, steps, F, lambda f,k: frame_noise(seeds,f,k,net.cfg), first=torch.from_numpy(real[:,0])).numpy()
        rep(f"{d} s{steps} realfirst", v)
