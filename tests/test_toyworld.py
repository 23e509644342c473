"""The toy world: deterministic drawing, captions, held-out pairs; slow: its CLIPs, CoOp on it."""

import json
import os
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import torch

import coop
import toyworld as tw


def test_drawing_is_deterministic_and_rgb_32px():
    a = tw.render("star", "red", "large", "striped", np.random.default_rng(3))
    b = tw.render("star", "red", "large", "striped", np.random.default_rng(3))
    assert a.size == (32, 32) and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    sketch = np.asarray(
        tw.render("circle", "red", "large", "plain", np.random.default_rng(3), style="sketch")
    )
    filled = np.asarray(tw.render("circle", "red", "large", "plain", np.random.default_rng(3)))
    red = lambda x: ((x[..., 0] > 150) & (x[..., 1] < 90)).sum()
    assert 0 < red(sketch) < red(filled)  # an outline has less ink than the filled shape


def test_every_shape_and_background_draws_something_different():
    rng = np.random.default_rng(0)
    masks = [np.asarray(tw.shape_mask(s, "large", np.random.default_rng(1))) for s in tw.SHAPES]
    assert all(m.max() == 255 for m in masks)
    assert len({m.tobytes() for m in masks}) == len(tw.SHAPES)
    for kind in tw.BACKGROUNDS:
        assert tw.background(kind, rng).shape == (32, 32, 3)


def test_captions_are_english_with_the_attributes():
    rng = np.random.default_rng(0)
    attrs = (tw.SHAPES.index("ring"), list(tw.COLOURS).index("blue"), 2, 3)
    captions = {tw.caption(attrs, rng) for _ in range(200)}
    assert all("ring" in c and c.endswith(".") for c in captions)
    assert any("blue ring" in c for c in captions) and any("large" in c for c in captions)
    assert any("striped background" in c for c in captions) and any(
        "blue" not in c for c in captions
    )


def test_the_longest_captions_fit_the_context():
    longest = [
        f"{o} {z} {s} in {c} on a {b} background."
        for o in tw.OPENINGS
        for z in tw.SIZES
        for s in tw.SHAPES
        for c in tw.COLOURS
        for b in tw.BACKGROUNDS
    ]
    eot = tw.clip.tokenize(longest, context_length=77).argmax(dim=-1)
    # and they reach the later positions
    assert eot.max() < tw.TEXT["context_length"] and eot.max() >= 18


def test_heldout_combinations_never_appear_in_pretraining():
    heldout = tw.heldout_combinations(0)
    assert len(heldout) == 12 and len({c for c, _ in heldout}) == 12  # one per colour
    attrs = tw.random_attributes(np.random.default_rng(0), 5000, heldout)
    colours = list(tw.COLOURS)
    assert not any((colours[c], tw.SHAPES[s]) in heldout for s, c, _, _ in attrs)


def test_datasets_are_image_folders_the_methods_read(tmp_path):
    classes = [("red_circle", "circle", "red"), ("blue_star", "star", "blue")]
    tw.write_dataset(str(tmp_path / "d"), classes, {"train": 2, "test": 3}, seed=0, sigma=30)
    data = coop.load_dataset(str(tmp_path / "d"))
    assert data["classnames"] == ["blue star", "red circle"] and len(data["test"]) == 6


def test_cached_tokenizer_equals_clip_tokenize():
    tokenize = tw.CachedTokenizer(24)
    texts = ["a photo of a red circle.", "a blue star.", "a photo of a red circle."]
    assert torch.equal(tokenize(texts), tw.clip.tokenize(texts, context_length=24))


def small_world(root, tiny_ckpt, splits, sketch):
    """A toy world of 4 classes with the tiny random CLIP as its ResNet tower."""
    classes = [("red_circle", "circle", "red"), ("blue_star", "star", "blue")]
    classes += [("green_ring", "ring", "green"), ("gray_cross", "cross", "gray")]
    for i, domain in enumerate([tw.TRAIN_DOMAIN] + tw.DOMAINS):
        style = "sketch" if sketch and i == 0 else "photo"
        tw.write_dataset(str(root / domain), classes, splits, seed=i, style=style)
    shutil.copy(tiny_ckpt, root / "clip_rn.pt")


def test_demo_runs_through_sweep_and_its_table_matches_the_runs(tmp_path, tiny_ckpt):
    root, out = tmp_path / "toy", tmp_path / "demo"
    small_world(root, tiny_ckpt, {"train": 2, "test": 2}, sketch=True)
    rows = tw.demo(
        str(root),
        str(out),
        shots=(1,),
        seeds=(1, 2),
        parallel=2,
        only=("CoOp", "CoCoOp", "ProGrad"),
    )
    assert [(r["label"], r["shots"]) for r in rows] == [
        ("Zero-shot CLIP (rn)", 0),
        ("CoOp", 1),
        ("CoCoOp", 1),
        ("ProGrad", 1),
    ]
    table = (out / "results.md").read_text()
    for r in rows[1:]:
        runs = [
            json.load(open(out / r["label"].lower() / f"1shot_seed{s}" / "metrics.json"))
            for s in (1, 2)
        ]
        new = [m["accuracy"]["new"] for m in runs]
        assert r["new"] == pytest.approx([float(np.mean(new)), float(np.std(new))])
        assert f"{np.mean(new):.1f}" in table
    assert "the paper's claim" in table and (out / "world.png").is_file()
    # every run is a command line that repeats it alone: run.log's first line, run again elsewhere
    # with the runner's thread count (2 runs side by side on 2 cores: one thread each)
    run = out / "coop" / "1shot_seed2"
    first_line = (run / "run.log").read_text().splitlines()[0]  # "# <date> <time> <command>"
    command = shlex.split(first_line.split(" ", 3)[3])
    command[command.index("--out") + 1] = str(tmp_path / "again")
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    subprocess.run(command, check=True, capture_output=True, env=env)
    again, first = [json.load(open(d / "metrics.json")) for d in (tmp_path / "again", run)]
    assert again["accuracy"] == first["accuracy"] and again["zero_shot"] == first["zero_shot"]


def test_the_ceiling_is_adapter_pys_linear_probe_on_every_training_image(tmp_path, tiny_ckpt):
    import adapter

    root = tmp_path / "toy"
    small_world(root, tiny_ckpt, {"train": 3, "val": 2, "test": 3}, sketch=False)
    ceiling = tw.ceilings(str(root), "rn")
    assert set(ceiling) == {"base", "new", *tw.DOMAINS}
    for column, data, part in [("base", tw.TRAIN_DOMAIN, "base"), ("noise", "noise", "all")]:
        m = adapter.main(adapter.parse_args(["--backbone", str(root / "clip_rn.pt"), "--data",
            str(root / data), "--subsample", part, "--method", "linear-probe", "--shots", "3",
            "--val-shots", "2", "--workers", "0", "--out", str(tmp_path / column)]))  # fmt: skip
        n_test = 3 * (2 if part == "base" else 4)
        # one image at most
        assert abs(ceiling[column] - m["accuracy"]["test"]) <= 100 / n_test + 1e-6, column


def test_the_fast_table_shows_the_test_time_rows_of_its_one_shard(tmp_path):
    stats = {}
    for i, (label, _, _, _) in enumerate(tw.TEST_TIME):
        folder = tmp_path / label
        folder.mkdir()
        accuracy = {"test": 10.0 + i, "shapes": 50.0 + i, "noise": 40.0 + i}
        metrics = {
            "seed": 1,
            "accuracy": accuracy,
            "zero_shot": {"test": 9.0, "shapes": 49.0, "noise": 39.0},
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
        stats[label] = tw.one_shard(str(folder))
    rows = tw.table_rows(stats, [])
    assert [r["label"] for r in rows] == ["Zero-shot CLIP (vit, 60-way)"] + [
        t[0] for t in tw.TEST_TIME
    ]
    table = tw.format_demo(rows, [], "toy", (1,), 1.0, full=False)
    # TPT vs zero-shot CLIP
    assert "| TPT | 10.0 | 50.0 | 40.0 |" in table and "+1.0 on base" in table
    assert "within noise (+1.0 on base, noise 5.9)" in table  # 100 images: twice the binomial error
    assert "python toyworld.py --demo --full" in table


def test_the_pretraining_pool_does_not_depend_on_the_number_of_workers():
    attrs = tw.random_attributes(np.random.default_rng(0), 16)
    assert torch.equal(
        tw.draw_pool_parallel(attrs, 1, workers=1), tw.draw_pool_parallel(attrs, 1, workers=2)
    )


def test_claims_compare_with_the_seeds_noise():
    row, zero = {"base": (20.0, 1.0)}, {"base": (11.0, 0.0)}
    assert tw.claim_verdict(row, zero, "base").startswith("yes (+9.0")
    assert tw.claim_verdict({"base": (12.0, 1.0)}, zero, "base").startswith("within noise")
    assert tw.claim_verdict({"base": (5.0, 1.0)}, zero, "base").startswith("no")
    # one seed on 100 test images: a 4-point gain at ~12 % is within twice the binomial error (6.6)
    assert tw.claim_verdict({"base": (14.0, 0.0)}, {"base": (10.0, 0.0)}, "base", 100).startswith(
        "within"
    )
    assert tw.claim_verdict({"base": (14.0, 0.0)}, {"base": (10.0, 0.0)}, "base", 6000).startswith(
        "yes"
    )


# --- slow: the pretrained toy world and what the methods do on it ---------------------------------
@pytest.mark.slow
def test_the_toy_clips_classify_far_above_chance(world):
    _, record = world
    for tower in ("rn", "vit"):
        zs = record[tower]["zero_shot"]
        # chance: 10/8/0.8
        assert zs["shape"] > 30 and zs["colour"] > 80 and zs["colour+shape"] > 20, (tower, zs)


@pytest.mark.slow
def test_coop_beats_zero_shot_on_the_shifted_domain_it_was_trained_on(world, tmp_path):
    root, _ = world
    argv = ["--backbone", os.path.join(root, "clip_rn.pt"), "--data", os.path.join(root, "sketch"),
        "--shots", "8", "--subsample", "base", "--ctx-init", "a photo of a", "--workers", "0",
        "--crop-scale", "0.5", "--out", str(tmp_path)]  # fmt: skip
    m = coop.main(coop.parse_args(argv))
    # measured 20.0 vs 11.3 on the default world (about a minute); 30-way, chance is 3.3
    assert m["accuracy"]["test"] > m["zero_shot"]["test"] + 5, json.dumps(m)
