import sys, time, json, numpy as np, torch
from dataclasses import replace
from pathlib import Path
from fewstep.models.text import TextEncoder
from fewstep.models.video import VideoDenoiser, frame_noise, student_stream
from fewstep.models.schedules import default_student_schedule
from fewstep.trainer import clips, video_judge
from fewstep.trainer.classifier import AttributeClassifier
from fewstep.trainer.video import VideoRecipe, train_student
from fewstep.trainer.video_eval import eval_prompts
torch.set_num_threads(2)
kw = json.loads(sys.argv[1]); tag = sys.argv[2]; init = sys.argv[3]; steps = int(sys.argv[4])
r = replace(VideoRecipe(), **kw)
judge = AttributeClassifier(); judge.load_state_dict(torch.load("/tmp/diag/judge_d2r.pt")); judge.eval()
enc = TextEncoder()
teacher = VideoDenoiser(r.config()); teacher.load_state_dict(torch.load(f"/tmp/diag/{init}.pt")); teacher.eval()
for p in teacher.parameters(): p.requires_grad_(False)
t0=time.time(); st, losses = train_student(r, teacher, enc, teacher, steps, "sf", self_forcing=True); print("train", time.time()-t0, np.mean(losses[-50:]), flush=True)
torch.save(st.state_dict(), f"/tmp/diag/{tag}.pt")
targets, prompts = eval_prompts(r); targets, prompts = targets[:24], prompts[:24]
states, mask = enc.encode(prompts)
F=48; seeds=[5_000_000+i for i in range(24)]
rng = np.random.default_rng([r.seed, 314159])
real = np.stack([clips.render(c, F, rng, r.size) for c in targets])
def rep(name, v):
    s = video_judge.score_streams(judge, v, targets)
    print(tag, name, "f0", s.window(0,1)["joint"], "1-16", s.window(1,16), "32-48", s.window(32,48), flush=True)
    np.save(f"/tmp/diag/{tag}_{name}.npy", v[:8,:16])
first = torch.from_numpy(real[:,0]); sched = default_student_schedule(); text = st.text_kv(states, mask)
for k in (1, 2, 4):
    noise = lambda f, s: frame_noise(seeds, f, s, st.cfg)
    rep(f"realfirst_s{k}", student_stream(st, text, sched, k, F, noise, first=first).numpy())
    rep(f"own_s{k}", student_stream(st, text, sched, k, F, noise).numpy())
