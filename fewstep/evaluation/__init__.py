"""Evaluation: the procedural worlds the reference models come from, probe sets, and judges.

A leaf every stage may use (it imports `fewstep.models` and `fewstep.errors` only): the trainer
evaluates what it trains, the exporters gate quantized artifacts, and the service gates new versions,
all with the same probe sets (`probes`) and judges (`judges`).

* `shapes`, `clips`: the procedural image and clip data (vocabulary, renderer, captions);
* `classifier`: the attribute classifier network that judges shapes and colours;
* `motion`: the centroid tracker that judges motion in streams;
* `probes`: fixed probe sets, by name; `judges`: the `Judge` protocol and judge networks, by name;
* `metrics`: PSNR, Fréchet distance, pairwise spread.
"""
