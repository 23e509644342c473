"""Does PromptAlign's step close the gap it aligns? PromptAlign (promptsync.py --loss align) adds
to TPT's entropy beta sum_l (0.5 mean|mu_l - mu^_l| + 0.5 mean|var_l - var^_l|) over the aligned
blocks l: the kept views' token means and variances against the source set's (mu^, var^). For
every test image this runs promptsync.py's own procedure (the same views, selection and step,
reset per image) and measures both terms on the kept views at the loaded prompts (before) and at
the tuned ones (after); it prints their mean over the images per block and writes them, per image
too, to <--out>/align_gap.json. The options are promptsync.py's, with its PromptAlign presets;
--load a source stage's checkpoint.

  python tools/align_gap.py --backbone toy/clip_vit.pt --data toy/clutter --eval-data toy/haze \\
      toy/shapes --load runs/demo/source/checkpoint.pt --crop-scale 0.5 --shard 0/6 --workers 0
"""

import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import promptsync as ps  # noqa: E402


@torch.no_grad()
def gap_terms(model, views, align, precision="fp32"):
    """[PromptAlign] the loss's two terms per aligned block on views (k, 3, H, W): (L, 2) lists."""
    tokens = []
    with ps.autocast(views.device, precision):
        model.image_features(views, tokens)  # every block's input tokens: (T, k, W) each
    stats = ps.view_statistics(tokens, align[0])
    return ps.token_alignment(*stats, *align[1:3], terms=True).tolist()


def image_gap(model, views, optimizer, scaler, align, steps=1, rho=0.1, precision="fp32"):
    """One test image, as promptsync.py's test stage runs it -> {"before": (L, 2), "after": ...}."""
    with torch.no_grad(), ps.autocast(views.device, precision):  # TPT's selection, as adapt's
        kept = ps.select_confident(model(views), rho)
    before = gap_terms(model, views[kept], align, precision)
    ps.adapt(model, views, optimizer, scaler, steps, rho, precision, align)
    return {"before": before, "after": gap_terms(model, views[kept], align, precision)}


def main(argv=None):
    args = ps.parse_args(["--loss", "align", *(sys.argv[1:] if argv is None else argv)])
    if not args.load or args.depth == 0:
        ps.fail("--load the checkpoint.pt of a promptsync.py --stage source run (MaPLe prompts)")
    device, ckpt = torch.device(args.device), ps.load_checkpoint(args.load)
    dataset, data, test_sets = ps.load_task(args, 0)
    clip_model = ps.load_clip(args.backbone, device, args.precision)
    model = ps.MultimodalPromptedCLIP(clip_model, data["classnames"], args.n_ctx, args.depth)
    config = dict(method="maple", backbone=args.backbone, n_ctx=args.n_ctx, depth=args.depth)
    ps.load_learned(model.to(device), ckpt, args.load, config)  # checked as promptsync.py's main
    align = ps.alignment_targets(args, ckpt, model)
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(learned, args.lr, weight_decay=args.weight_decay)
    initial = copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict()))
    n_px, (K, N) = model.clip.visual.input_resolution, map(int, args.shard.split("/"))
    views = ps.Views(n_px, args.views, args.augmix, args.crop_scale, args.corrupt)
    fp16, per_image = args.precision != "fp32" and device.type == "cuda", []  # TPT's scaler
    for name, (items, classnames) in test_sets.items():
        model.prompts.set_classnames(model.clip, classnames)
        todo = [(i, *item) for i, item in enumerate(items) if i % N == K]
        for x, _, i in ps.ViewDataset(todo, views, args.seed):
            model.prompts.load_state_dict(initial[0])  # [TPT] episodic: reset the prompts
            optimizer.load_state_dict(initial[1])  # ... and AdamW's state
            scaler = torch.amp.GradScaler(device.type, init_scale=1000, enabled=fp16)
            step = (args.steps, args.rho, args.precision)
            per_image.append(image_gap(model, x.to(device), optimizer, scaler, align, *step))
            per_image[-1].update(set=name, index=i)
    mean = lambda when: np.mean([g[when] for g in per_image], axis=0).round(6).tolist()  # (L, 2)
    blocks = [str(b) for b in align[0]]
    result = {w: dict(zip(blocks, mean(w))) for w in ("before", "after")}
    print(f"{len(per_image)} images; per block [mean|mu - mu^|, mean|var - var^|]: {result}")
    out = args.out or os.path.join("runs", "align_gap", dataset)
    os.makedirs(out, exist_ok=True)
    ps.save(os.path.join(out, "align_gap.json"), dict(result, images=per_image, args=vars(args)))
    return result


if __name__ == "__main__":
    main()
