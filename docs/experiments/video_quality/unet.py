import sys, time, json, numpy as np, torch, torch.nn.functional as F
from fewstep.models.text import TextEncoder
from fewstep.models.unet import image_unet_config, build_unet, denoise
from fewstep.trainer import clips, video_judge
from fewstep.trainer.classifier import AttributeClassifier
from fewstep.trainer.teacher import cosine_lr, Ema
from fewstep.trainer.progress import Progress
from fewstep.trainer.video import VideoRecipe
from fewstep.trainer.video_eval import eval_prompts
from dataclasses import replace
torch.set_num_threads(2)
steps, batch, width = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); tag = sys.argv[4]
judge = AttributeClassifier(); judge.load_state_dict(torch.load("/tmp/diag/judge_d2r.pt")); judge.eval()
enc = TextEncoder(); torch.manual_seed(0); g = torch.Generator().manual_seed(0)
unet = build_unet(image_unet_config(16, width)).train(); ema = Ema(unet, 0.999)
print("params", sum(p.numel() for p in unet.parameters()))
opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
ns, nm = enc.encode([""]); pr = Progress("unet", steps, 200)
for step in range(steps):
    for gr in opt.param_groups: gr["lr"] = 1e-3 * cosine_lr(step, steps, warmup=100)
    video, _, caps = clips.batch(0, step, batch, 1, 16); x0 = torch.from_numpy(video[:, 0])
    states, mask = enc.encode(caps)
    drop = torch.rand(batch, generator=g) < 0.1
    states = torch.where(drop[:, None, None], ns.expand_as(states), states); mask = torch.where(drop[:, None], nm.expand_as(mask), mask)
    t = torch.sigmoid(torch.randn(batch, generator=g)); eps = torch.randn(x0.shape, generator=g)
    xt = (1 - t.view(-1,1,1,1)) * x0 + t.view(-1,1,1,1) * eps
    loss = F.mse_loss(denoise(unet, xt, t, states, mask), eps - x0)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step(); ema.update(unet)
    pr.update(loss=loss.item())
net = ema.module.eval()
r = replace(VideoRecipe(), eval_streams=64); targets, prompts = eval_prompts(r)
states, mask = enc.encode(prompts); nS, nM = ns.expand(64, -1, -1), nm.expand(64, -1)
with torch.no_grad():
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)); grid = torch.linspace(1, 0, 17)
    for k in range(16):
        t = torch.full((64,), float(grid[k])); vc = denoise(net, x, t, states, mask); vu = denoise(net, x, t, nS, nM)
        x = x + (grid[k+1] - grid[k]) * (vu + 3.0 * (vc - vu))
v = x.clamp(-1, 1).numpy()[:, None]
s = video_judge.score_streams(judge, v, targets); print(tag, s.window(0, 1), flush=True)
