"""The shared blocks: data reading and its checks, CLIP loading, the cut text encoder, run files."""

import argparse
import ast
import functools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT, make_image_folder, tiny_clip
from PIL import Image

import coop

CPU = torch.device("cpu")


# --- CLIP loading ---------------------------------------------------------------------------------
def test_state_dict_file_loads_exactly(tiny_ckpt):
    model = coop.load_clip(tiny_ckpt, CPU, "fp32")
    reference = tiny_clip().state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k  # the fallback puts back the file's fp32 values
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.dtype == torch.float32


def test_torchscript_archive_loads(tmp_path):
    model = tiny_clip(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            model, (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
        )
        torch.jit.save(traced, tmp_path / "traced.pt")  # the kind of file OpenAI distributes
    loaded = coop.load_clip(str(tmp_path / "traced.pt"), CPU, "fp32")
    # clip.load's build_model rounds weights to fp16, as for OpenAI's files
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=2e-3, rtol=1e-3)


def test_fp16_keeps_clips_own_layout(tiny_ckpt):
    model = coop.load_clip(tiny_ckpt, CPU, "fp16")
    assert model.dtype == torch.float16 and model.ln_final.weight.dtype == torch.float32


def test_unknown_backbone_lists_the_names():
    with pytest.raises(SystemExit, match="ViT-B/99 not found.*RN50.*ViT-B/16"):
        coop.load_clip("ViT-B/99", CPU, "fp32")


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(SystemExit, match="junk.pt: not a CLIP checkpoint"):
        coop.load_clip(str(tmp_path / "junk.pt"), CPU, "fp32")


# --- the cut text encoder -------------------------------------------------------------------------
@pytest.mark.parametrize("vit", [False, True])
def test_cut_text_encoder_equals_the_full_77_positions(vit):
    model = tiny_clip(vit=vit, seed=1)
    texts = [
        "a photo of a red circle.",
        "x",
        "a much longer sentence about a small green square on a striped mat.",
    ]
    tokens = coop.tokenize(model, texts)
    with torch.no_grad():
        full = model.encode_text(tokens)  # CLIP's own encoder over all 77 positions
        cut = coop.text_encoder(model, model.token_embedding(tokens), tokens)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def prompts_for(model, names, n_ctx=4):
    """Embeddings of 'X X X X <name>.' with a random context in place of the X's, and its pieces."""
    tokens = coop.tokenize(model, [" ".join(["X"] * n_ctx) + f" {c}." for c in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokens)
    ctx = torch.randn(n_ctx, embedding.shape[-1], requires_grad=True)
    return tokens, embedding, ctx


@pytest.mark.parametrize("vit", [False, True])
def test_shared_prefix_encoder_equals_the_cut_and_the_77_position_encoders(vit):
    model = tiny_clip(vit=vit, seed=1)
    names = ["red", "green circle", "a very long class name of many words", "x"]  # 1 to 8 tokens
    tokens, embedding, ctx = prompts_for(model, names)
    encoder = functools.partial(coop.text_encoder, model)
    full = torch.cat([embedding[:, :1], ctx.expand(len(names), -1, -1), embedding[:, 5:]], dim=1)
    cut = encoder(full, tokens)  # (C, D)
    shared = coop.shared_prefix(
        model, torch.cat([embedding[:1, :1], ctx[None]], dim=1), embedding[:, 5:], tokens
    )
    assert shared.shape == (1, len(names), cut.shape[-1])
    torch.testing.assert_close(shared[0], cut, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and CLIP's own encoder over all 77 positions, for the plain texts
        plain = model.encode_text(tokens)
        mine = coop.shared_prefix(model, embedding[:1, :5], embedding[:, 5:], tokens)[0]
    torch.testing.assert_close(mine, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(cut)  # the context's gradient, through a loss on every feature
    g_cut = torch.autograd.grad((cut * weights).sum(), ctx)[0]
    g_shared = torch.autograd.grad((shared[0] * weights).sum(), ctx)[0]
    torch.testing.assert_close(g_shared, g_cut, atol=1e-5, rtol=1e-4)


def test_shared_prefix_encoder_with_one_prefix_per_image_and_under_autocast():
    model = tiny_clip(seed=2)
    names = ["red", "green circle", "blue square thing"]
    tokens, embedding, ctx = prompts_for(model, names)
    # CoCoOp: every image shifts the context
    encoder, pi = functools.partial(coop.text_encoder, model), torch.randn(3, 64)
    prefix = torch.cat([embedding[:1, :1].expand(3, -1, -1), ctx + pi[:, None]], dim=1)  # (B, 5, d)
    shared = coop.shared_prefix(model, prefix, embedding[:, 5:], tokens)  # (B, C, D)
    for b in range(3):
        full = torch.cat(
            [embedding[:, :1], (ctx + pi[b]).expand(3, -1, -1), embedding[:, 5:]], dim=1
        )
        torch.testing.assert_close(shared[b], encoder(full, tokens), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision amp on the CPU
        amp_shared = coop.shared_prefix(model, prefix, embedding[:, 5:], tokens)
        amp_cut = encoder(
            torch.cat([embedding[:, :1], (ctx + pi[0]).expand(3, -1, -1), embedding[:, 5:]], 1),
            tokens,
        )
    cos = torch.nn.functional.cosine_similarity(amp_shared[0].float(), amp_cut.float(), dim=-1)
    assert (cos > 0.999).all()  # bf16 rounds differently along the two paths, nothing more


def test_shared_prefix_encoder_replaces_deep_prompts_before_the_later_blocks():
    model = tiny_clip(seed=3)  # 2 text blocks: a deep prompt replaces positions 1..2 before block 1
    names = ["red", "green circle"]
    tokens, embedding, ctx = prompts_for(model, names, n_ctx=2)
    deep = torch.randn(2, 64)
    prefix = torch.cat([embedding[:1, :1], ctx[None]], dim=1)
    out = coop.shared_prefix(model, prefix, embedding[:, 3:], tokens, deep=[deep])[0]
    # by hand: run block 0 on the full prompts, overwrite positions 1..2, run block 1
    full = torch.cat([embedding[:, :1], ctx.expand(2, -1, -1), embedding[:, 3:]], dim=1)
    n = int(tokens.argmax(-1).max()) + 1
    x = (full[:, :n] + model.positional_embedding[:n]).permute(1, 0, 2)
    mask = torch.full((n, n), float("-inf")).triu_(1)
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        if i == 1:
            x = torch.cat([x[:1], deep[:, None].expand(-1, 2, -1), x[3:]])
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = (
        model.ln_final(x.permute(1, 0, 2)[torch.arange(2), tokens.argmax(-1)])
        @ model.text_projection
    )
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_ensemble_is_the_normalised_mean_of_normalised_features():
    model = tiny_clip(seed=2)
    names = ["red", "blue"]
    w = coop.zeroshot_classifier(model, names, ["a photo of a {}.", "art of the {}."])
    with torch.no_grad():
        f = [
            torch.nn.functional.normalize(
                model.encode_text(coop.tokenize(model, [t.format(c) for c in names])), dim=-1
            )
            for t in ["a photo of a {}.", "art of the {}."]
        ]
    expected = torch.nn.functional.normalize(f[0] + f[1], dim=-1)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)


# --- data -----------------------------------------------------------------------------------------
def test_image_folder_and_classnames(tmp_path):
    make_image_folder(tmp_path / "d" / "test", ["golden_retriever", "cat"], 2)
    data = coop.load_dataset(str(tmp_path / "d"))
    assert data["classnames"] == ["cat", "golden retriever"] and data["train"] == []
    names = "cat\tfelis catus\ngolden_retriever a golden retriever\n"  # as CoOp's ImageNet
    (tmp_path / "d" / "classnames.txt").write_text(names)
    data = coop.load_dataset(str(tmp_path / "d"))
    assert data["classnames"] == ["felis catus", "a golden retriever"]
    assert [y for _, y in data["test"]] == [0, 0, 1, 1]


def test_split_file(split_data):
    image_root, split_file = split_data
    data = coop.load_dataset(image_root, split_file)
    assert data["classnames"][0] == "red thing"  # '_' -> ' '
    assert len(data["train"]) == 18 and len(data["val"]) == 6 and len(data["test"]) == 6
    assert all(os.path.isfile(p) for p, _ in data["test"])


def test_few_shot_sampling_is_seeded_and_per_class(tiny_data):
    train = coop.load_dataset(tiny_data)["train"]
    a, b = coop.sample_few_shot(train, 2, seed=1), coop.sample_few_shot(train, 2, seed=1)
    assert a == b and a != coop.sample_few_shot(train, 2, seed=2)
    assert sorted(y for _, y in a) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_more_shots_than_images_keeps_all(tiny_data):
    train = coop.load_dataset(tiny_data)["train"]
    assert len(coop.sample_few_shot(train, 16, seed=1)) == len(train)


def test_base_new_split_sorted_ceil_half_relabelled(split_data):
    data = coop.load_dataset(*split_data)  # 6 classes
    base, new = coop.subsample_classes(data, "base"), coop.subsample_classes(data, "new")
    assert (
        base["classnames"] == data["classnames"][:3] and new["classnames"] == data["classnames"][3:]
    )
    assert {y for _, y in base["test"]} == {0, 1, 2} and {y for _, y in new["test"]} == {0, 1, 2}
    odd = {k: [(p, y) for p, y in v if y < 5] for k, v in data.items() if k != "classnames"}
    odd["classnames"] = data["classnames"][:5]
    assert len(coop.subsample_classes(odd, "base")["classnames"]) == 3  # ceil(5 / 2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "folder not found"),
        ("no_test", "no test/ folder"),
        ("empty_class", "no valid file for the classes c"),
        ("unreadable", "cannot read this image"),
    ],
)
def test_bad_data_is_named_before_any_work(tmp_path, case, message):
    root = tmp_path / "d"
    if case != "missing":
        make_image_folder(root / "train", ["a", "b"], 2)
    if case not in ("missing", "no_test"):
        make_image_folder(root / "test", ["a", "b"], 2)
    if case == "empty_class":
        os.makedirs(root / "train" / "c")
        os.makedirs(root / "test" / "c")
    if case == "unreadable":
        (root / "train" / "a" / "9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=message) as e:
        data = coop.load_dataset(str(root / "nothing" if case == "missing" else root))
        coop.check_images(data["train"])
    if case == "unreadable":
        assert "9.jpg" in str(e.value)


def test_load_task_opens_the_training_images_only_when_it_draws_shots(tmp_path):
    """A bad training image stops a few-shot run before any work; a run without shots (zero-shot,
    a test stage, an evaluation) never reads the training images (ImageNet: 1.28M files)."""
    make_image_folder(tmp_path / "train", ["a", "b"], 2)
    make_image_folder(tmp_path / "test", ["a", "b"], 2)
    (tmp_path / "train" / "a" / "9.jpg").write_bytes(b"not a jpeg")
    args = argparse.Namespace(data=str(tmp_path), split_file=None, subsample="all", eval_data=[])
    name, data, test_sets = coop.load_task(args)  # no shots: no error
    assert len(data["train"]) == 5 and len(test_sets["test"][0]) == 4
    with pytest.raises(SystemExit, match="9.jpg: cannot read this image"):
        coop.load_task(argparse.Namespace(**vars(args), seed=1), shots=3)


def test_grayscale_rgba_palette_are_converted(tiny_data):
    items = coop.load_dataset(tiny_data)["train"]
    modes = [Image.open(path).mode for path, _ in items[:4]]
    assert modes == ["RGB", "L", "RGBA", "P"]  # the fixture's four kinds of image
    coop.check_images(items)  # readable: no error
    dataset = coop.ImageDataset(items, coop.test_transform(32))
    assert all(dataset[i][0].shape == (3, 32, 32) for i in range(4))


def test_train_and_test_transforms():
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 10, 10))
    assert coop.train_transform(32)(image).shape == (3, 32, 32)
    x = coop.test_transform(32)(image)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(
        x[0, 0, 0], torch.tensor((200 / 255 - coop.CLIP_MEAN[0]) / coop.CLIP_STD[0])
    )


# --- run folder -----------------------------------------------------------------------------------
def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = tmp_path / "m.json"
    coop.save(str(path), {"a": 1})
    with pytest.raises(TypeError):
        coop.save(str(path), {"a": object()})  # fails half-way through writing
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["m.json"]
    coop.save(str(tmp_path / "c.pt"), {"state": {"ctx": torch.ones(2)}, "epoch": 3})
    assert coop.load_checkpoint(str(tmp_path / "c.pt"))["epoch"] == 3
    coop.save(str(tmp_path / "log.jsonl"), "one\ntwo\n")
    assert (tmp_path / "log.jsonl").read_text() == "one\ntwo\n"


# --- the house layout -----------------------------------------------------------------------------
METHOD_FILES = ["zeroshot.py", "coop.py", "prograd.py", "adapter.py", "vpt.py", "promptsync.py"]


@pytest.mark.parametrize("name", METHOD_FILES)
def test_the_method_comes_first_and_lines_fit_a_slide(name):
    """A reader meets the method (its plain form) first: its first definition within 150 lines,
    the exact speed-ups after main and parse_args, the plumbing last."""
    path = os.path.join(ROOT, name)
    lines = open(path).read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("class ", "def ")))
    assert first + 1 < 150, f"{name}: the method starts at line {first + 1}"
    where = lambda start: next((i for i, l in enumerate(lines) if l.startswith(start)), len(lines))
    main, parse = where("def main("), where("def parse_args(")
    assert where("def train_step(") in (len(lines), *range(main))  # none (zeroshot), or first
    assert main < parse < where("# --- shared: appendix")
    assert where("# --- shared: speed-ups") > parse, f"{name}: a speed-up stands before main"
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not wide, f"{name}: lines wider than 100 columns: {wide[:10]}"


def test_every_python_file_fits_a_slide():
    """Not only the method files: tests, tools, toyworld.py and bench.py are read side by side."""
    files = [
        os.path.join(folder, name)
        for folder in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools"))
        for name in sorted(os.listdir(folder))
        if name.endswith(".py")
    ]
    assert len(files) > 15
    wide = [
        f"{os.path.relpath(path, ROOT)}:{i}"
        for path in files
        for i, line in enumerate(open(path).read().splitlines(), 1)
        if len(line) > 100
    ]
    assert not wide, f"lines wider than 100 columns: {wide[:10]}"


# --- the shared blocks stay identical -------------------------------------------------------------
def test_shared_blocks_identical_in_every_file():
    out = subprocess.run(
        [sys.executable, "tools/sync_shared.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout


def test_sync_tool_detects_and_repairs_a_changed_copy(tmp_path):
    for name in ("coop.py", "zeroshot.py"):
        (tmp_path / name).write_text(open(os.path.join(ROOT, name)).read())
    text = (tmp_path / "zeroshot.py").read_text()
    (tmp_path / "zeroshot.py").write_text(
        text.replace("def accuracy(logits, labels):", "def accuracy(logits, y):", 1)
    )
    tool = [sys.executable, os.path.join(ROOT, "tools/sync_shared.py"), "--root", str(tmp_path)]
    check = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "appendix" in check.stdout
    subprocess.run(tool + ["--write"], check=True, capture_output=True)
    assert (tmp_path / "zeroshot.py").read_text() == text


# --- the command line, presets, resume ------------------------------------------------------------
def test_make_loader_pins_memory_only_for_a_cuda_device(tiny_data):
    items = coop.load_dataset(tiny_data)["train"]
    transform = coop.test_transform(32)
    assert not coop.make_loader(items, transform, 4, 0, "cpu").pin_memory
    assert coop.make_loader(items, transform, 4, 0, torch.device("cuda")).pin_memory


def toy_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--fancy", action="store_true")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--epochs", type=int, help="epochs")
    p.add_argument("--lr", type=float, help="learning rate")
    return p


PRESETS = {"plain": dict(epochs=coop.epochs_for_shots, lr=0.002), "fancy": dict(epochs=10, lr=0.1)}


def test_presets_fill_only_the_options_left_out_and_help_lists_them(capsys):
    method = lambda a: "fancy" if a.fancy else "plain"
    args = coop.parse(toy_parser(), ["--device", "cpu"], PRESETS, method, learned=False)
    assert (args.epochs, args.lr, args.precision) == (100, 0.002, "fp32")  # epochs by 4 shots
    assert args.out is None  # an option without a default is there, as None
    args = coop.parse(
        toy_parser(), ["--fancy", "--lr", "1", "--device", "cpu"], PRESETS, method, False
    )
    assert (args.epochs, args.lr) == (10, 1.0)  # the given option wins over the preset
    with pytest.raises(SystemExit):
        coop.parse(toy_parser(), ["--help"], PRESETS, method, learned=False)
    shown = " ".join(capsys.readouterr().out.split())
    assert "plain: 50/100/200 for 1/2-4/8-16 shots (CoOp's configs); fancy: 10" in shown
    assert "plain: 0.002; fancy: 0.1" in shown
    assert "(default: 4)" in shown and "(default: None)" not in shown  # no default, no noise


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_cuda_device_is_refused_without_cuda():
    with pytest.raises(SystemExit, match="CUDA is not available here; use --device cpu"):
        coop.parse(toy_parser(), ["--device", "cuda"], PRESETS, lambda a: "plain")


def test_resume_restores_the_loss_scale_and_starts_fresh_without_a_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler, generator = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.Generator()
    config = dict(method="m")
    assert coop.resume(str(tmp_path), model, optimizer, scaler, generator, config) == (0, 0)
    assert (tmp_path / "log.jsonl").read_text() == ""  # a fresh log
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n')
    scaler.scale(torch.ones(())), scaler.update(512.0)  # as after a step that lowered the scale
    coop.save_progress(str(tmp_path), config, model, optimizer, scaler, 1, 2.5, generator)
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # killed before its save
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert coop.resume(str(tmp_path), model, optimizer, fresh, generator, config) == (1, 2.5)
    assert fresh.get_scale() == 512.0 and (tmp_path / "log.jsonl").read_text() == '{"epoch": 1}\n'


def test_lint_finds_no_unused_name_and_no_statement_that_does_nothing():
    """ruff check with the project's rules (pyproject.toml): pyflakes, pycodestyle, import order,
    and B018 (an expression statement whose value is dropped, such as a stray `80`)."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.parametrize("name", METHOD_FILES + ["bench.py"])
def test_no_function_is_longer_than_60_lines(name):
    """A function a reader can hold in view; parse_args (one line per option) aside."""
    tree = ast.parse(open(os.path.join(ROOT, name)).read())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1})" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno >= 60
            and n.name != "parse_args"]  # fmt: skip
    assert not long, f"{name}: {long}"
