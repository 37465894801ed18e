import json, numpy as np, torch
from pathlib import Path
from PIL import Image
from fewstep.models.text import TextEncoder
from fewstep.models.schedules import FewStepSchedule
from fewstep.models.video import frame_noise, student_stream, KVCache
from fewstep.trainer import clips, video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net
from fewstep.trainer.video_eval import load_judge, eval_prompts
torch.set_num_threads(2)
out = Path("checkpoints"); r = VideoRecipe()
judge = load_judge(out/"shapes-video-judge")
targets, prompts = eval_prompts(r)
targets, prompts = targets[:16], prompts[:16]
enc = TextEncoder(); states, mask = enc.encode(prompts); ns, nm = enc.encode([""]*16)
F = 32; seeds=[5_000_000+i for i in range(len(targets))]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, F, rng, r.size) for c in targets])
def rep(name, v):
    s = video_judge.score_streams(judge, v, targets)
    print(name, "1-16", s.window(1,16), "16-32", s.window(16,32), flush=True)
@torch.inference_mode()
def teacher_first(net, first, steps=16, g=3.0):
    text, null = net.text_kv(states, mask), net.text_kv(ns, nm)
    b=len(seeds); c1, c2 = KVCache.empty(net.cfg,b), KVCache.empty(net.cfg,b)
    net.write(first, text, c1); net.write(first, null, c2); outv=[first]
    grid = torch.linspace(1,0,steps+1); gen=torch.Generator().manual_seed(0)
    for f in range(1,F):
        x = torch.randn(first.shape, generator=gen)
        for k in range(steps):
            t=torch.full((b,), float(grid[k])); vc=net.denoise(x,t,text,c1); vu=net.denoise(x,t,null,c2)
            x = x + (grid[k+1]-grid[k])*(vu+g*(vc-vu))
        x=x.clamp(-1,1); net.write(x,text,c1); net.write(x,null,c2); outv.append(x)
    return torch.stack(outv,1).numpy()
first = torch.from_numpy(real[:,0])
tv = teacher_first(load_video_net(out/"shapes-video-teacher"), first)
rep("teacher realfirst", tv)
copy = np.repeat(real[:, :1], F, axis=1); rep("copy", copy)
sched = FewStepSchedule.from_dict(json.loads((out/"shapes-video"/"manifest.json").read_text())["schedule"])
net = load_video_net(out/"shapes-video"); text = net.text_kv(states, mask)
sv = student_stream(net, text, sched, 2, F, lambda f,k: frame_noise(seeds,f,k,net.cfg), first=first).numpy()
def strip(v):  # rows streams, cols frames
    v = ((v[:6,:16]+1)*127.5).clip(0,255).astype(np.uint8)  # (6,16,3,16,16)
    v = v.transpose(0,3,1,4,2).reshape(6*16, 16*16, 3)
    return np.kron(v, np.ones((4,4,1),dtype=np.uint8))
img = np.concatenate([strip(real), np.full((8, 16*16*4, 3), 255, np.uint8), strip(tv), np.full((8, 16*16*4,3),255,np.uint8), strip(sv)], 0)
Image.fromarray(img).save("/tmp/diag/strip.png"); print(prompts[:6])
