import sys, time, json, numpy as np, torch
from dataclasses import replace
from pathlib import Path
from fewstep.models.text import TextEncoder
from fewstep.models.video import KVCache
from fewstep.trainer import clips, video_judge
from fewstep.trainer.video import VideoRecipe, train_teacher, sample_stream
from fewstep.trainer.video_eval import load_judge, eval_prompts
from fewstep.models.checkpoint import save_checkpoint
torch.set_num_threads(2)
kw = json.loads(sys.argv[1]); tag = sys.argv[2]
r = replace(VideoRecipe(), **kw)
enc = TextEncoder()
t0=time.time(); net, losses = train_teacher(r, enc, log_every=200); print("train", time.time()-t0, np.mean(losses[-50:]), flush=True)
torch.save(net.state_dict(), f"/tmp/diag/{tag}.pt")
judge = load_judge(Path("checkpoints/shapes-video-judge"))
targets, prompts = eval_prompts(r); targets, prompts = targets[:24], prompts[:24]
states, mask = enc.encode(prompts); ns, nm = enc.encode([""]*24)
F=48; seeds=[5_000_000+i for i in range(24)]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, F, rng, r.size) for c in targets])
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
def rep(name, v):
    s = video_judge.score_streams(judge, v, targets)
    print(tag, name, "f0", s.window(0,1)["joint"], "1-16", s.window(1,16), "32-48", s.window(32,48), flush=True)
first = torch.from_numpy(real[:,0])
for g in (1.0, 3.0):
    rep(f"realfirst g{g}", teacher_first(net, first, 16, g))
    v = sample_stream(net, net.text_kv(states,mask), net.text_kv(ns,nm), F, seeds, 16, g)
    rep(f"own g{g}", v)
