# E20: a weight average ("model soup") of video students that share an architecture, judged like E15b.
# Usage: python e20_soup.py FOLDER [FOLDER ...]   (each a checkpoint folder: model.safetensors + manifest)
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e15_reanchored import evaluate

from fewstep.models.text import TextEncoder
from fewstep.trainer.video import VideoRecipe, load_video_net

if __name__ == "__main__":
    torch.set_num_threads(2)
    nets = [load_video_net(Path(f)) for f in sys.argv[1:]]
    states = [n.state_dict() for n in nets]
    soup = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    net = nets[0]
    net.load_state_dict(soup)
    evaluate(net, TextEncoder(), Path("checkpoints"), VideoRecipe(), f"E20 soup of {len(nets)}", steps_list=(2,))
