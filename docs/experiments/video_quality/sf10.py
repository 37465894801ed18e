# E11: self-forcing on top of E10 (nxt2000.pt): each step the model continues real first frames on its own
# (1 step per frame, through its cache), and every later frame is regressed onto the real clip while seeing
# those generated frames. Then continuation of real first frames over 256 frames, as the model card judges.
import sys, time, json, numpy as np, torch
from dataclasses import replace
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser, frame_noise, student_stream
from fewstep.models.schedules import default_student_schedule
from fewstep.trainer import clips, video_judge
from fewstep.trainer.classifier import AttributeClassifier
from fewstep.trainer.video import VideoRecipe
from fewstep.trainer.teacher import cosine_lr
from fewstep.trainer.progress import Progress
from fewstep.trainer.video_eval import eval_prompts
torch.set_num_threads(2)
kw = json.loads(sys.argv[1]); tag = sys.argv[2]; steps = int(sys.argv[3]); init = sys.argv[4]
r = replace(VideoRecipe(), **kw)
judge = AttributeClassifier(); judge.load_state_dict(torch.load("/tmp/diag/judge_big.pt")); judge.eval()
enc = TextEncoder(); torch.manual_seed(0); g = torch.Generator().manual_seed(1)
net = VideoDenoiser(r.config()); net.load_state_dict(torch.load(f"/tmp/diag/{init}.pt"))
sched = default_student_schedule()
targets, prompts = eval_prompts(r); states_e, mask_e = enc.encode(prompts)
F = 256; seeds = [5_000_000 + i for i in range(len(targets))]
rng = np.random.default_rng([r.seed, 314159])
real_e = np.stack([clips.render(c, F, rng, r.size) for c in targets])
def evaluate(name):
    net.eval()
    v = student_stream(net, net.text_kv(states_e, mask_e), sched, 1, F, lambda f, s: frame_noise(seeds, f, s, net.cfg),
                       first=torch.from_numpy(real_e[:, 0])).numpy()
    s = video_judge.score_streams(judge, v, targets)
    print(tag, name, "2-17", s.window(1, 17), "33-48", s.window(32, 48), "241-256", s.window(240, 256), flush=True)
    np.save(f"/tmp/diag/{tag}_{name}.npy", v[:8, :16])
evaluate("before")
opt = torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=0.0); pr = Progress("self-forcing", steps, 100)
shape = (r.student_batch, 3, r.size, r.size)
for step in range(steps):
    for gr in opt.param_groups: gr["lr"] = r.lr * cosine_lr(step, steps, warmup=50)
    video, _, caps = clips.batch(r.seed + 7, 10**6 + step, r.student_batch, r.frames, r.size)
    real = torch.from_numpy(video); states, mask = enc.encode(caps)
    net.eval()
    with torch.no_grad():
        context = student_stream(net, net.text_kv(states, mask), sched, 1, r.frames,
                                 lambda f, k: torch.randn(shape, generator=g), first=real[:, 0]).clone()
    net.train()
    z = torch.randn(real.shape, generator=g); t = torch.ones(real.shape[:2])
    v = net.forward_parallel(context, z, t, states, mask)
    loss = ((z - v - real)[:, 1:] ** 2).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    pr.update(loss=loss.item())
torch.save(net.state_dict(), f"/tmp/diag/{tag}.pt")
evaluate("after")
