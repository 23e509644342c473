"""The documentation keeps its promises: README.md is a front door (at most 250 lines), no page
links to a file that is not there, every command shown parses with its script's own parse_args
(so no page shows an option that does not exist), and the README's single-method examples run."""

import glob
import importlib
import json
import os
import re
import shlex

import pytest
import torch
from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = "zeroshot coop prograd adapter vpt promptsync bench sweep toyworld".split()
METHODS = SCRIPTS[:6]  # the method files: --data is required, --epochs where they train
COMMAND = re.compile(r"\bpython3?\s+(" + "|".join(SCRIPTS) + r")\.py\b")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def code(text):
    """The commands a page shows: each line of its fenced code blocks (continuations joined), and
    each inline code span."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def commands(text):
    """-> [(script, argv)] for every `python <script>.py ...` shown, shell syntax taken away:
    env assignments, `&&`, `;`, `|`, `&`, redirections, comments, for-loop words; shell variables
    become plain values ($K -> 0 so that --shard $K/4 is 0/4)."""
    found = []
    for line in code(text):
        if not COMMAND.search(line):
            continue
        line = re.sub(r"\$\{?K\}?\b", "0", line)
        line = re.sub(r"\$\{?seed\}?\b", "1", line)
        line = re.sub(r"\$\{?\w+\}?", "x", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens, words = list(lexer), []
        for t in tokens + [";"]:
            if t and set(t) <= set("|&;<>"):
                found += parse_words(words)
                words = [] if ">" not in t and "<" not in t else ["<redirect>"]
            elif words == ["<redirect>"]:
                words = []  # the redirection's file
            else:
                words.append(t)
    return found


def parse_words(words):
    while words and (re.match(r"^\w+=", words[0]) or words[0] in ("do", "then", "time")):
        words = words[1:]
    if len(words) < 2 or words[0] not in ("python", "python3"):
        return []
    script = words[1].removesuffix(".py")
    placeholder = {"K/N": "0/1"} | {letter: "1" for letter in "KMN"}  # `--workers N`, `--shard K/N`
    argv = [placeholder.get(w, w) for w in words[2:] if w != "..."]
    return [(script, argv)] if script in SCRIPTS else []


def shown():
    """(page, script, argv) of every command on every page."""
    out = []
    for page in PAGES:
        for script, argv in commands(read(page)):
            out.append((os.path.relpath(page, ROOT), script, argv))
    return out


def test_readme_is_a_front_door():
    lines = read(os.path.join(ROOT, "README.md")).count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_link_points_to_a_file(page):
    text = re.sub(r"^```.*?^```", "", read(page), flags=re.M | re.S)  # links outside code
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{os.path.relpath(page, ROOT)} links to missing files: {missing}"


def test_the_pages_show_commands():
    scripts = {script for _, script, _ in shown()}
    assert set(METHODS) <= scripts and {"bench", "sweep", "toyworld"} <= scripts


@pytest.mark.parametrize("page, script, argv", shown(), ids=lambda x: str(x)[:60])
def test_every_command_shown_parses(page, script, argv, tmp_path, monkeypatch):
    if any(a.startswith("cuda") for a in argv) and not torch.cuda.is_available():
        pytest.skip("--device cuda needs CUDA here")
    module = importlib.import_module(script)
    if script in METHODS and "--data" not in argv and "--help" not in argv and "-h" not in argv:
        argv = argv + ["--data", "DATA/example"]  # the methods table shows the rest of a command
    if script == "sweep" and "--" in argv and "--method" in argv:  # the method's own options
        method = argv[argv.index("--method") + 1].removesuffix(".py")
        extras = [a for a in argv[argv.index("--") + 1 :] if a != "source"]
        importlib.import_module(method).parse_args(extras + ["--data", "DATA/example"])
    monkeypatch.chdir(tmp_path)  # nothing a parser might touch lands in the repository
    try:
        module.parse_args(argv)
    except SystemExit as e:
        assert "--help" in argv and e.code == 0, f"{page}: python {script}.py {shlex.join(argv)}"


def readme_examples():
    """The README's single-method runs: on the toy world, and on the reader's own ImageFolder."""
    out = []
    for script, argv in commands(read(os.path.join(ROOT, "README.md"))):
        data = argv[argv.index("--data") + 1] if "--data" in argv else ""
        if script in METHODS and (data.startswith("toy/") or data == "my_dataset"):
            out.append((script, argv))
    return out


def test_the_readme_shows_a_run_on_your_own_images():
    assert any(argv[argv.index("--data") + 1] == "my_dataset" for _, argv in readme_examples())


@pytest.mark.parametrize("script, argv", readme_examples(), ids=lambda x: str(x)[:50])
def test_readme_examples_run_on_the_tiny_fixtures(
    script, argv, tiny_ckpt, tiny_vit_ckpt, tiny_data, shifted_data, tmp_path
):
    """The README's command, on the tests' tiny CLIP and image folders, for a couple of epochs."""
    swap = {"toy/clip_rn.pt": tiny_ckpt, "toy/clip_vit.pt": tiny_vit_ckpt, "my_dataset": tiny_data}
    swap |= {"toy/sketch": tiny_data, "toy/shapes": shifted_data, "toy/noise": shifted_data}
    argv = [swap.get(a, a) for a in argv]
    if "--shots" in argv:  # the fixtures have 6 training images per class: keep some for val
        argv[argv.index("--shots") + 1] = "2"
    if "--backbone" not in argv:  # the paper's backbone would be downloaded: the tiny one instead
        argv += ["--backbone", tiny_vit_ckpt if script in ("vpt", "promptsync") else tiny_ckpt]
    else:
        i = argv.index("--backbone") + 1
        argv[i] = argv[i] if os.path.isfile(argv[i]) else tiny_ckpt
    module = importlib.import_module(script)
    method = argv[argv.index("--method") + 1] if "--method" in argv else None
    trains = script in ("coop", "prograd", "vpt") or (script == "adapter" and method != "tip")
    extra = ["--epochs", "2"] if trains else []  # a couple of epochs
    out = str(tmp_path / "run")
    module.main(module.parse_args(argv + extra + ["--workers", "0", "--out", out]))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert 0 <= metrics["accuracy"]["test"] <= 100
