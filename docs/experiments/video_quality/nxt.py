import sys, time, json, numpy as np, torch
from dataclasses import replace
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser, frame_noise, student_stream
from fewstep.models.schedules import default_student_schedule
from fewstep.trainer import clips, video_judge
from fewstep.trainer.classifier import AttributeClassifier
from fewstep.trainer.video import VideoRecipe, corrupt
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.progress import Progress
from fewstep.trainer.video_eval import eval_prompts
torch.set_num_threads(2)
kw = json.loads(sys.argv[1]); tag = sys.argv[2]; steps = int(sys.argv[3])
r = replace(VideoRecipe(), **kw)
judge = AttributeClassifier(); judge.load_state_dict(torch.load("/tmp/diag/judge_big.pt")); judge.eval()
enc = TextEncoder(); torch.manual_seed(0); g = torch.Generator().manual_seed(0)
net = VideoDenoiser(r.config()).train(); opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=0.01)
pr = Progress("next", steps, 100); t0 = time.time()
for step in range(steps):
    for gr in opt.param_groups: gr["lr"] = r.lr * cosine_lr(step, steps, warmup=50)
    video, _, caps = clips.batch(r.seed, step, r.batch, r.frames, r.size)
    x0 = torch.from_numpy(video); states, mask = enc.encode(caps)
    t = torch.ones(r.batch, r.frames); z = torch.randn(x0.shape, generator=g)
    ctx = corrupt(x0, r.context_noise, g)
    v = net.forward_parallel(ctx, z, t, states, mask)
    loss = ((z - v - x0)[:, 1:] ** 2).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    pr.update(loss=loss.item())
net.eval(); torch.save(net.state_dict(), f"/tmp/diag/{tag}.pt")
targets, prompts = eval_prompts(r); targets, prompts = targets[:24], prompts[:24]
states, mask = enc.encode(prompts)
F=48; seeds=[5_000_000+i for i in range(24)]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, F, rng, r.size) for c in targets])
first = torch.from_numpy(real[:,0]); sched = default_student_schedule(); text = net.text_kv(states, mask)
v = student_stream(net, text, sched, 1, F, lambda f, s: frame_noise(seeds, f, s, net.cfg), first=first).numpy()
s = video_judge.score_streams(judge, v, targets)
print(tag, "1-16", s.window(1,16), "32-48", s.window(32,48), flush=True); np.save(f"/tmp/diag/{tag}.npy", v[:8,:16])
