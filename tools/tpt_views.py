"""Does TPT's assumption hold on a test set? TPT (promptsync.py --loss tpt) lowers the entropy of
the mean prediction of an image's most confident views, so it helps where those views are right
more often than the whole image. With the frozen prompt ("a photo of a {}."), on the views that
promptsync.py draws (the same seed, crops and flips), this prints the accuracy of
  the original image (zero-shot CLIP);  the single most confident view;
  the mean prediction of the rho most confident views, TPT's target, for several rho;
  "any view": an image counts if at least one of its views is classified right (an upper bound).
On the CPU, with crops and flips only (no AugMix: TPT's setting for the domain-shift sets).

  python tools/tpt_views.py --backbone toy/clip_vit.pt --data toy/clutter --crop-scale 0.5 \
      --shard 0/6                                      # the toy demo's TPT run on clutter
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import promptsync as ps  # noqa: E402


def view_accuracies(logits, labels, rhos=(0.05, 0.1, 0.25, 1.0)):
    """logits (n, N, C) of n images' N views (view 0 the original), labels (n,) -> {name: %}."""
    hit = lambda predictions: 100.0 * (predictions == labels).float().mean().item()
    probs = logits.softmax(dim=-1)  # (n, N, C)
    entropy = -(probs * logits.log_softmax(dim=-1)).sum(dim=-1)  # (n, N)
    out = {"original": hit(logits[:, 0].argmax(-1))}
    surest = logits[torch.arange(len(labels)), entropy.argmin(dim=-1)]  # (n, C)
    out["most confident view"] = hit(surest.argmax(-1))
    for rho in rhos:  # [TPT select] the views of the lowest entropy, then their mean prediction
        kept = [ps.select_confident(v, rho) for v in logits]
        target = torch.stack([p[k].mean(dim=0) for p, k in zip(probs, kept)])  # (n, C)
        out[f"confident views' mean, rho {rho}"] = hit(target.argmax(-1))
    out["any view"] = 100.0 * (logits.argmax(-1) == labels[:, None]).any(-1).float().mean().item()
    return out


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, help="CLIP name or checkpoint path")
    p.add_argument("--data", required=True, help="an ImageFolder root with test/")
    p.add_argument("--views", type=int, default=64, help="views per image (TPT: 64)")
    p.add_argument("--crop-scale", type=float, default=0.08, help="the crops' smallest area")
    p.add_argument("--shard", default="0/1", help="k/n: every n-th test image, from the k-th")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    device, (shard_k, shard_n) = torch.device("cpu"), map(int, args.shard.split("/"))
    clip_model = ps.load_clip(args.backbone, device, "fp32")
    data = ps.load_dataset(args.data)
    model = ps.MultimodalPromptedCLIP(clip_model, data["classnames"], n_ctx=4, depth=0)
    text = model.text_features()  # the prompt before any tuning: (C, D)
    views = ps.Views(clip_model.visual.input_resolution, args.views, crop_scale=args.crop_scale)
    todo = [(i, *item) for i, item in enumerate(data["test"]) if i % shard_n == shard_k]
    dataset, logits, labels = ps.ViewDataset(todo, views, args.seed), [], []
    for k in range(len(dataset)):
        x, y, _ = dataset[k]
        logits.append(model.logits(model.image_features(x), text))  # (views, C)
        labels.append(y)
    for name, value in view_accuracies(torch.stack(logits), torch.tensor(labels)).items():
        print(f"{name:32s} {value:5.1f}")


if __name__ == "__main__":
    main()
