import sys, time, json, numpy as np, torch
from dataclasses import replace
from fewstep.models.text import TextEncoder
from fewstep.trainer import video_judge
from fewstep.trainer.classifier import AttributeClassifier
from fewstep.trainer.video import VideoRecipe, train_teacher, sample_stream
from fewstep.trainer.video_eval import eval_prompts
torch.set_num_threads(2)
kw = json.loads(sys.argv[1]); tag = sys.argv[2]
r = replace(VideoRecipe(), **kw)
judge = video_judge.train_frame_classifier(r.seed, r.judge_steps, r.size).eval(); torch.save(judge.state_dict(), f"/tmp/diag/judge_{tag}.pt")
v, tg = video_judge.real_streams(r.seed+1, 64, 48, r.size); s = video_judge.score_streams(judge, v, tg); print("judge", s.window(0,48), flush=True)
enc = TextEncoder()
t0=time.time(); net, losses = train_teacher(r, enc, log_every=200); print("train", time.time()-t0, np.mean(losses[-50:]), flush=True)
torch.save(net.state_dict(), f"/tmp/diag/{tag}.pt")
r2 = replace(r, eval_streams=64); targets, prompts = eval_prompts(r2)
states, mask = enc.encode(prompts); ns, nm = enc.encode([""]*64)
for g in (1.0, 3.0):
    v = sample_stream(net, net.text_kv(states,mask), net.text_kv(ns,nm), 1, list(range(64)), 16, g)
    s = video_judge.score_streams(judge, v, targets); print(tag, g, s.window(0,1), flush=True)
    np.save(f"/tmp/diag/{tag}_g{g}.npy", v[:, 0])
