import sys, numpy as np, torch
from pathlib import Path
from fewstep.models.text import TextEncoder
from fewstep.trainer import clips, video_judge
from fewstep.trainer.video import VideoRecipe, load_video_net, sample_stream
from fewstep.trainer.video_eval import load_judge, eval_prompts
from dataclasses import replace
torch.set_num_threads(2)
r = replace(VideoRecipe(), eval_streams=64)
judge = load_judge(Path("checkpoints/shapes-video-judge"))
targets, prompts = eval_prompts(r)
enc = TextEncoder(); states, mask = enc.encode(prompts); ns, nm = enc.encode([""]*64)
net = load_video_net(Path("checkpoints/shapes-video-teacher"))
for steps, g in ((16, 3.0), (32, 3.0), (16, 1.0)):
    v = sample_stream(net, net.text_kv(states,mask), net.text_kv(ns,nm), 2, list(range(64)), steps, g)
    s = video_judge.score_streams(judge, v, targets); print(steps, g, s.window(0,1), s.window(1,2), flush=True)
