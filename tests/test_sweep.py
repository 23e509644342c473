"""sweep.py: plans are the papers' protocols and parse with each method's own parse_args; the runner
resumes a killed sweep; SLURM and GNU parallel tasks (one plan line each) skip, lock, log, check
their own dependency and survive SIGUSR1; the table's statistics, variants, averages, shard merging
and the papers' numbers; the plots; FGVCAircraft's split file."""

import csv
import importlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, draw

import sweep

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are faster on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_root(tmp_path, names=None):
    """A data root with the folders and (empty) files the plan checks for, nothing in them."""
    root = str(tmp_path / "DATA")
    for name in names or [*sweep.DATASETS, *sweep.VARIANTS]:
        for path, _ in sweep.dataset_options(root, name)[1]:
            if path.endswith((".json", ".txt")):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "w").close()
            else:
                os.makedirs(path, exist_ok=True)
    return root


def plan_lines(argv, capsys):
    assert sweep.main(sweep.parse_args(["plan", *argv])) == 0
    return capsys.readouterr().out.splitlines()


def test_plan_prints_the_papers_commands_the_same_every_time(tmp_path, capsys):
    root = fake_root(tmp_path, ["OxfordPets", "EuroSAT"])
    argv = ["few-shot", "--method", "coop.py", "--root", root, "--datasets", "oxford_pets"]
    argv += ["EuroSAT", "--shots", "1", "2", "--seeds", "1", "--", "--backbone", "ViT-B/16"]
    lines = plan_lines(argv, capsys)
    pets = (
        f"--data {root}/oxford_pets/images --split-file {root}/oxford_pets/split_zhou_OxfordPets"
        ".json --template 'a photo of a {}, a type of pet.'"
    )
    sat = (
        f"--data {root}/eurosat/2750 --split-file {root}/eurosat/split_zhou_EuroSAT.json "
        "--template 'a centered satellite photo of {}.'"
    )
    out = "runs/sweep/few-shot/coop_backbone_ViT-B-16"
    opts = "--resume --backbone ViT-B/16"  # the method's checkpoints, then the user's options
    assert lines == [
        f"python coop.py {pets} --shots 1 --seed 1 {opts} --out {out}/OxfordPets/1shot_seed1",
        f"python coop.py {pets} --shots 2 --seed 1 {opts} --out {out}/OxfordPets/2shot_seed1",
        f"python coop.py {sat} --shots 1 --seed 1 {opts} --out {out}/EuroSAT/1shot_seed1",
        f"python coop.py {sat} --shots 2 --seed 1 {opts} --out {out}/EuroSAT/2shot_seed1",
    ]
    assert plan_lines(argv, capsys) == lines  # re-planning gives the same folders: run resumes


CASES = [  # (method file, its options): every variant whose options the plan reads
    ("zeroshot.py", []),
    ("coop.py", []),
    ("coop.py", ["--cocoop"]),
    ("prograd.py", []),
    ("adapter.py", ["--method", "tip-f"]),
    ("adapter.py", ["--method", "linear-probe"]),
    ("vpt.py", ["--method", "deep"]),
    ("promptsync.py", []),
    ("promptsync.py", ["--loss", "align"]),
]


@pytest.mark.parametrize("method,extras", CASES, ids=[" ".join([m, *e]) for m, e in CASES])
def test_every_planned_command_parses_with_the_methods_own_parse_args(method, extras, tmp_path):
    root = fake_root(tmp_path)
    module = importlib.import_module(method[:-3])
    test_time = method == "promptsync.py"
    for protocol in sweep.PROTOCOLS:
        if test_time and protocol in ("few-shot", "base-to-new"):
            with pytest.raises(SystemExit, match="test time"):
                sweep.plan_commands(protocol, method, root, extras=extras)
            continue
        commands, needs = sweep.plan_commands(protocol, method, root, extras=extras)
        assert sweep.missing_paths(needs) == {}
        outs = {c[-1]: stage for stage, c in commands}
        assert len(outs) == len(commands), "every run has its own folder"
        for stage, tokens in commands:
            line = shlex.join(tokens)
            assert shlex.split(line)[:2] == ["python", method]
            args = module.parse_args(shlex.split(line)[2:])  # SystemExit if an option is unknown
            assert args.out == tokens[-1] and os.path.exists(args.data)
            assert all(os.path.isdir(d) for d in args.eval_data)
            if getattr(args, "split_file", None):
                assert os.path.isfile(args.split_file)
            # a stage-2 run tests what a stage-1 run of this plan learned
            if getattr(args, "load", None):
                assert stage == 2 and outs[os.path.dirname(args.load)] == 1
            # a run that saves checkpoints resumes after a stop: every line but eval-only ones
            resumes = sweep.METHODS[method[:-3]].get("resume") and not args.eval_only
            resumes = resumes and getattr(args, "stage", "test") == "test"
            assert bool(getattr(args, "resume", False)) == bool(resumes)
            if test_time and getattr(args, "stage", "test") == "test":
                K, N = args.shard.split("/")
                assert N == "4" and tokens[-1].endswith(f"shard{K}of4")
        datasets = {c[-1].split("/")[-2] for _, c in commands}
        runs, learns = len(commands), method != "zeroshot.py"
        if protocol == "few-shot":  # the 11 datasets x 5 shot counts x 3 seeds
            assert datasets == set(sweep.DATASETS) and runs == (165 if learns else 11)
        elif protocol == "base-to-new":
            assert runs == (33 if learns else 11) and all("--subsample" in c for _, c in commands)
        elif protocol == "cross-dataset" and not test_time:  # ImageNet, then the 10 others
            assert datasets == set(sweep.DATASETS) and runs == (33 if learns else 11)
        elif protocol == "domain-generalisation" and not test_time:
            assert runs == (3 if learns else 1) and datasets == {"ImageNet"}
            assert all(len(module.parse_args(c[2:]).eval_data) == 4 for _, c in commands)
        elif protocol == "cross-dataset":  # 10 datasets x 4 shards (+ 1 source stage)
            assert runs == 40 + ("--loss" in extras)
        else:  # ImageNet and its 4 shifts x 4 shards (TPT's Table 1)
            assert runs == 20 + ("--loss" in extras) and "ImageNet" in datasets
    if method == "prograd.py":  # the papers' per-dataset settings, which the file leaves to us
        commands, _ = sweep.plan_commands("few-shot", method, root, ["EuroSAT", "ImageNet"])
        parsed = [(c[-1].split("/")[-2], module.parse_args(c[2:])) for _, c in commands]
        run = {(dataset, args.shots): args for dataset, args in parsed}
        assert run[("EuroSAT", 16)].lam == 0.8 and run[("EuroSAT", 4)].lam == 1.0
        assert run[("ImageNet", 16)].epochs == 50 and run[("EuroSAT", 16)].epochs == 200


def test_a_missing_dataset_folder_or_split_file_stops_plan_before_it_prints(tmp_path, capsys):
    root = fake_root(tmp_path, ["OxfordPets", "EuroSAT"])
    os.remove(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"))
    argv = ["few-shot", "--method", "coop.py", "--root", root, "--datasets", "OxfordPets"]
    with pytest.raises(SystemExit, match="eurosat/split_zhou_EuroSAT.json") as e:
        plan_lines(argv + ["EuroSAT", "DescribableTextures"], capsys)
    assert f"{root}/dtd/images" in str(e.value) and "oxford_pets" not in str(e.value)
    assert capsys.readouterr().out == ""  # not one command printed
    assert len(plan_lines(argv + ["EuroSAT", "--no-check"], capsys)) == 30
    with pytest.raises(SystemExit, match="test sets only"):
        plan_lines(argv[:5] + ["--datasets", "imagenet-a"], capsys)
    with pytest.raises(SystemExit, match="--seed"):  # the plan sets it for every run
        plan_lines(argv + ["--no-check", "--", "--seed", "4"], capsys)


def test_a_killed_run_resumes_running_only_the_rest(tiny_ckpt, tiny_data, tmp_path, capsys):
    """A grid of 4 CoOp runs with 2 workers, killed (SIGKILL) once the first has finished, and
    started again: the finished runs are kept as they are, and only the rest run."""
    out = str(tmp_path / "runs")
    argv = ["few-shot", "--method", os.path.join(ROOT, "coop.py"), "--datasets", tiny_data]
    argv += ["--shots", "1", "--seeds", "1", "2", "3", "4", "--out", out, "--python"]
    argv += [sys.executable, "--", "--backbone", tiny_ckpt, "--epochs", "1", "--workers", "0"]
    # the runner's own skipping is tested here, not the method's --resume (the SIGUSR1 tests)
    lines = [line.replace(" --resume ", " ") for line in plan_lines(argv, capsys)]
    plan = tmp_path / "plan.txt"
    plan.write_text("\n".join(lines) + "\n")
    folders = [shlex.split(line)[-1] for line in lines]
    assert len(folders) == 4 and all(f.startswith(out) for f in folders)
    metrics = [os.path.join(f, "metrics.json") for f in folders]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU, as on a laptop
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), "run", str(plan), "--workers", "2"]
    runner = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(map(os.path.isfile, metrics)) and runner.poll() is None:
        assert time.time() < deadline, "no run finished in 2 minutes"
        time.sleep(0.05)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    done = {m: os.stat(m).st_mtime_ns for m in metrics if os.path.isfile(m)}
    assert 1 <= len(done) < 4
    if fcntl is not None:  # the runs it had started die with it: no process holds their lock
        for folder in folders:
            lock = os.path.join(folder, ".sweep.lock")
            while os.path.isfile(lock):
                try:
                    with open(lock) as f:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, f"{folder}: a run outlived the killed runner"
                    time.sleep(0.05)
    after_kill = {m for m in metrics if os.path.isfile(m)}
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rest = 4 - len(after_kill)
    assert f"{len(after_kill)} finished before, {rest} to run" in again.stderr
    assert f"ran {rest}: {rest} finished, 0 failed" in again.stderr
    assert all(os.stat(m).st_mtime_ns == t for m, t in done.items())  # kept as they were
    assert all(json.load(open(m))["seed"] == i for i, m in enumerate(metrics, 1))
    assert all(os.path.isfile(os.path.join(f, "run.log")) for f in folders)


# A stand-in for a method file that keeps the method files' contract: it trains --epochs epochs
# (--sleep seconds each), saves checkpoint.pt after each, and on SIGUSR1 ends its epoch, saves and
# exits (status 1, "stopped by SIGUSR1 after epoch N; rerun with --resume"); --resume continues
# from the checkpoint (a folder without one starts fresh). Its accuracy depends on every epoch.
FAKE_METHOD = """import json, os, signal, sys, time
argv, a = sys.argv[1:], {}
while argv:
    key = argv.pop(0)
    a[key] = True if key == "--resume" else argv.pop(0)
out, stop = a["--out"], []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
os.makedirs(out, exist_ok=True)
print("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), "threads", os.environ.get("OMP_NUM_THREADS"))
if "--load" in a and not os.path.isfile(a["--load"]):
    sys.exit("started before the run it loads: " + a["--load"])
checkpoint, seed = os.path.join(out, "checkpoint.pt"), int(a.get("--seed", 1))
state = {"epoch": 0, "value": seed}
if a.get("--resume") and os.path.isfile(checkpoint):
    state = json.load(open(checkpoint))
epochs = int(a.get("--epochs", 1))
for epoch in range(state["epoch"], epochs):
    time.sleep(float(a.get("--sleep", 0)))
    state = {"epoch": epoch + 1, "value": (state["value"] * 31 + epoch) % 997}
    json.dump(state, open(checkpoint + ".tmp", "w"))
    os.replace(checkpoint + ".tmp", checkpoint)
    print("epoch", epoch + 1, flush=True)
    if stop and epoch + 1 < epochs:
        sys.exit(f"stopped by SIGUSR1 after epoch {epoch + 1}; rerun with --resume")
if "--fail" in a:
    sys.exit("failing on purpose")
names = {"--method": "fake", "--dataset": "d"}
m = {k[2:]: a.get(k, v) for k, v in names.items()}
m.update(seed=seed, shots=int(a.get("--shots", 0)), accuracy={"test": state["value"] / 10})
json.dump({k[2:]: v for k, v in a.items()}, open(os.path.join(out, "args.json"), "w"))
json.dump(m, open(os.path.join(out, "metrics.json"), "w"))
"""


def test_run_orders_loads_after_their_runs_reports_failures_and_gives_each_worker_a_gpu(
    tmp_path, monkeypatch
):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_METHOD)
    out = lambda name: str(tmp_path / name)
    run = lambda name, *opts: shlex.join([sys.executable, str(fake), *opts, "--out", out(name)])
    commands = [
        run("B", "--load", out("A/checkpoint.pt")),  # listed first, starts after A
        run("A", "--sleep", "1"),
        run("C", "--fail", "1"),
        run("D", "--load", out("C/checkpoint.pt")),  # C fails: D is not run
        run("E"),
    ]
    stream = io.StringIO()
    result = sweep.run_plan(commands, workers=2, gpus=["3", "5"], stream=stream)
    assert sorted(result["ok"]) == [out("A"), out("B"), out("E")]
    assert result["failed"] == [out("C")] and result["blocked"] == [out("D")]
    assert f"log: {out('C')}/run.log" in stream.getvalue()
    assert "failing on purpose" in open(out("C") + "/run.log").read()
    gpu = lambda name: open(out(name) + "/run.log").read().split("gpu ")[1].split()[0]
    assert {gpu("A"), gpu("C")} == {"3", "5"}  # side by side, one GPU each
    # again: every finished run is skipped, the failed one runs again
    result = sweep.run_plan(commands, workers=2, gpus=[], stream=io.StringIO())
    assert len(result["finished"]) == 3 and result["failed"] == [out("C")]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # on the CPU, the cores are shared
    sweep.run_plan([run("F")], workers=2, gpus=[], stream=io.StringIO())
    threads = open(out("F") + "/run.log").read().split("threads ")[1].split()[0]
    assert gpu("F") == "None" and threads == str(max(1, os.cpu_count() // 2))


def write_run(folder, **metrics):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def test_table_mean_and_population_std_over_seeds_each_run_once(tmp_path, capsys):
    runs = tmp_path / "runs"
    coop = dict(method="coop", backbone="RN50", dataset="OxfordPets", shots=16)
    for seed, acc, zs in [(1, 70.0, 60.0), (2, 72.0, 61.0), (3, 77.0, 62.0)]:
        accuracy = {"test": acc, "imagenet-sketch": acc - 20}
        write_run(runs / f"coop/seed{seed}", **coop, seed=seed, accuracy=accuracy,
                  zero_shot={"test": zs})  # fmt: skip
    write_run(runs / "coop_eurosat", **dict(coop, dataset="EuroSAT"), seed=1,
              accuracy={"test": 50.0, "imagenet-sketch": 30.0})  # fmt: skip
    shutil.copytree(runs / "coop/seed1", runs / "copy/seed1")  # the same run twice: counted once
    more = {"test": 77.0, "imagenet-sketch": 57.0, "imagenet-r": 60.0}  # ... as the one with
    write_run(runs / "dg/seed3", **coop, seed=3, accuracy=more, zero_shot={"test": 62.0})  # more
    os.symlink(runs / "coop", runs / "link")  # the same files again: silently once
    (runs / "bad").mkdir()
    (runs / "bad/metrics.json").write_text('{"method": "coop", "accur')  # killed while writing
    b2n = dict(method="cocoop", backbone="ViT-B/16", dataset="EuroSAT", shots=16)
    for seed, base, new in [(1, 80.0, 70.0), (2, 82.0, 74.0)]:
        write_run(runs / f"b2n{seed}", **b2n, seed=seed, accuracy={"test": base, "new": new},
                  harmonic_mean=2 * base * new / (base + new))  # fmt: skip
    tip = dict(method="tip-f", backbone="RN50", dataset="OxfordPets", shots=16, seed=1)
    write_run(runs / "tip", **tip, accuracy={"test": 88.0}, zero_shot={"test": 85.0})
    rows = {(r["method"], r["dataset"]): r for r in sweep.collect(str(runs))}
    warnings = capsys.readouterr().err
    assert f"{runs}/bad/metrics.json: skipped" in warnings
    assert f"{runs}/copy/seed1/metrics.json: the same run" in warnings and "link" not in warnings
    assert (
        f"{runs}/coop/seed3/metrics.json: the same run as {runs}/dg/seed3/metrics.json" in warnings
    )
    row = rows[("coop", "OxfordPets")]
    assert row["seeds"] == [1, 2, 3] and row["stats"]["test"] == (73.0, np.std([70, 72, 77]))
    assert row["stats"]["test"][1] == pytest.approx((26 / 3) ** 0.5)  # population std (ddof 0)
    assert row["stats"]["zero-shot"] == pytest.approx((61.0, (2 / 3) ** 0.5))
    assert row["stats"]["ImageNetSketch"][0] == 53.0  # a domain column, by the papers' name
    average = rows[
        ("coop", "Average (2 of 10 datasets but ImageNet: OxfordPets, EuroSAT)")
    ]  # named by its datasets
    assert average["stats"]["test"][0] == 61.5 and average["paper"] == {}  # the mean of the means
    b2n = rows[("cocoop", "EuroSAT")]["stats"]
    assert b2n["test"] == (81.0, 1.0) and b2n["new"] == (72.0, 2.0)
    assert b2n["H"][0] == pytest.approx(2 * 81 * 72 / (81 + 72))  # H of the mean base and new
    paper = rows[("tip-f", "OxfordPets")]["paper"]  # Tip-Adapter's exp.log, RN50, 16 shots
    source = "tip-log|16 shots|Tip-Adapter-F"
    assert paper == {"test": (89.70, source), "zero-shot": (85.83, source)}
    text = sweep.format_table(list(rows.values()))
    assert "| coop | RN50 | OxfordPets | 16 | 3 | 61.00 ± 0.82 |  | 73.00 ± 2.94 |  |" in text
    assert "| tip-f | RN50 | OxfordPets | 16 | 1 | 85.00 | 85.83 [1] | 88.00 | 89.70 [1] |" in text
    assert (
        "\n[1] Tip-Adapter-F, 16 shots: Tip-Adapter's repository (gaopengcuhk/Tip-Adapter)" in text
    )
    assert "### Base-to-new" in text and "| base | new | H |" in text
    table = list(csv.DictReader(io.StringIO(sweep.format_table(list(rows.values()), "csv"))))
    pets = [r for r in table if r["method"] == "coop" and r["dataset"] == "OxfordPets"][0]
    assert float(pets["test"]) == 73.0 and float(pets["test_std"]) == pytest.approx(2.9439, 1e-4)


def test_sharded_test_time_runs_merge_to_the_unsharded_accuracy(tiny_vit_ckpt, tiny_data, tmp_path):
    import promptsync as ps

    common = ["--backbone", tiny_vit_ckpt, "--data", tiny_data, "--views", "8", "--rho", "0.25"]
    common += ["--lr", "0.5", "--workers", "0"]
    whole = ps.main(ps.parse_args(common + ["--out", str(tmp_path / "whole")]))
    shards = [str(tmp_path / f"sharded/tpt/shard{K}") for K in range(3)]
    for K, shard in enumerate(shards):
        ps.main(ps.parse_args(common + ["--shard", f"{K}/3", "--out", shard]))
    assert [len(ps.read_predictions(s)) for s in shards] == [4, 4, 4]  # a third each
    [row] = sweep.collect(str(tmp_path / "sharded"))
    assert row["stats"]["test"] == (whole["accuracy"]["test"], 0.0) and row["seeds"] == [1]
    assert row["stats"]["zero-shot"][0] == whole["zero_shot"]["test"]
    [row] = sweep.collect(str(tmp_path))  # the shards and the whole run: the same run, once
    os.remove(os.path.join(shards[2], "metrics.json"))  # a shard still running
    assert sweep.collect([shards[0], shards[1]]) == []


def test_shards_in_the_documented_per_image_format_merge(tmp_path):
    """{"index", "label", "prediction"} per line of predictions.jsonl, args.json's "shard" K/N."""
    labels, predicted = [0, 1, 2, 1, 0, 2, 2], [0, 1, 1, 1, 2, 2, 2]  # 5 of 7 right
    for K in range(2):
        folder = tmp_path / f"shard{K}"
        mine = [i for i in range(7) if i % 2 == K]
        accuracy = 100 * np.mean([predicted[i] == labels[i] for i in mine])
        write_run(folder, method="m", dataset="d", seed=1, accuracy={"test": accuracy})
        (folder / "args.json").write_text(json.dumps({"shard": f"{K}/2"}))
        lines = [json.dumps(dict(index=i, label=labels[i], prediction=predicted[i])) for i in mine]
        (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n" + '{"index": 9, "la')
    [row] = sweep.collect(str(tmp_path))
    assert row["stats"]["test"][0] == pytest.approx(100 * 5 / 7)


# ------------------------------------------------------------------------------------------------
# plan: each protocol's paper settings
# ------------------------------------------------------------------------------------------------
def parsed_plan(tmp_path, protocol, method, extras=(), **options):
    """-> [(dataset folder, the method's parsed args)] of a plan, stage by stage."""
    module = importlib.import_module(method[:-3])
    commands, _ = sweep.plan_commands(
        protocol, method, fake_root(tmp_path), extras=extras, **options
    )
    return [(c[-1].split("/")[-2], module.parse_args(c[2:])) for _, c in commands]


def test_each_protocol_plans_its_papers_backbone_context_shots_epochs_and_lambda(tmp_path):
    # CoCoOp without flags: ViT-B/16 (its preset: 4 vectors from 'a photo of a', 10 epochs)
    for _, args in parsed_plan(tmp_path, "base-to-new", "coop.py", ["--cocoop"]):
        assert args.cocoop and args.backbone == "ViT-B/16" and args.epochs == 10
    # CoOp in CoCoOp's Table 1: ViT-B/16, 4 vectors from "a photo of a", 200 epochs (ImageNet 50)
    for dataset, args in parsed_plan(tmp_path, "base-to-new", "coop.py"):
        assert (args.backbone, args.ctx_init, args.subsample) == (
            "ViT-B/16",
            "a photo of a",
            "base",
        )
        assert args.epochs == (50 if dataset == "ImageNet" else 200)  # the file's 200 at 16 shots
    # CoOp's few-shot figure: RN50 (the file's default), 16 random vectors
    for _, args in parsed_plan(tmp_path, "few-shot", "coop.py", datasets=["EuroSAT"]):
        assert args.backbone == "RN50" and args.ctx_init == "" and args.n_ctx == 16
    # ProGrad's base2new scripts: 4 shots, rn50_ep100 (ImageNet rn50_ep50), lambda 1
    for dataset, args in parsed_plan(tmp_path, "base-to-new", "prograd.py"):
        assert (args.shots, args.backbone, args.lam) == (4, "RN50", 1.0)
        assert args.epochs == (50 if dataset == "ImageNet" else 100)
    # lambda 0.8 at 8 and 16 shots on Flowers, DTD, EuroSAT, in every protocol that trains there
    hard = ["OxfordFlowers", "DescribableTextures", "EuroSAT", "OxfordPets"]
    for dataset, args in parsed_plan(tmp_path, "few-shot", "prograd.py", datasets=hard):
        assert args.lam == (0.8 if args.shots >= 8 and dataset != "OxfordPets" else 1.0)
    for _, args in parsed_plan(tmp_path, "cross-dataset", "prograd.py"):
        assert args.lam == 1.0 and args.shots == 16  # trained on ImageNet (50 epochs)
        assert args.eval_only or args.epochs == 50
    # zero-shot CLIP beside CoCoOp and TPT: ViT-B/16 there, RN50 (CoOp's figure) in few-shot
    assert {a.backbone for _, a in parsed_plan(tmp_path, "base-to-new", "zeroshot.py")} == {
        "ViT-B/16"
    }
    assert {a.backbone for _, a in parsed_plan(tmp_path, "few-shot", "zeroshot.py")} == {"RN50"}
    # the user's options after -- still win (the papers' settings are left out, not repeated)
    [(_, args)] = parsed_plan(
        tmp_path,
        "base-to-new",
        "coop.py",
        ["--cocoop", "--backbone", "RN50"],
        datasets=["EuroSAT"],
        seeds=[1],
    )
    assert args.backbone == "RN50"


def test_test_time_plans_augmix_on_fine_grained_sets_and_promptaligns_learning_rates(tmp_path):
    for dataset, args in parsed_plan(tmp_path, "cross-dataset", "promptsync.py"):
        assert args.augmix == 1 and args.lr == 5e-3  # TPT: augmix = len(set_id) > 1
    plan = parsed_plan(tmp_path, "domain-generalisation", "promptsync.py")
    assert {d for d, _ in plan} == {"ImageNet", *sweep.VARIANTS}  # TPT's Table 1 has ImageNet
    assert not any(args.augmix for _, args in plan)
    for protocol, lr in [("cross-dataset", 5e-4), ("domain-generalisation", 4e-2)]:
        plan = parsed_plan(tmp_path, protocol, "promptsync.py", ["--loss", "align"])
        source = [args for _, args in plan if args.stage == "source"]
        assert len(source) == 1 and source[0].lr == 0.0026  # MaPLe's own recipe
        tests = [args for _, args in plan if args.stage == "test"]
        assert tests and all(a.lr == lr and not a.augmix for a in tests)  # PromptAlign: no AugMix
        if protocol == "domain-generalisation":  # MaPLe itself on the shifts, not on ImageNet
            assert len(source[0].eval_data) == 4
    plan = parsed_plan(tmp_path, "domain-generalisation", "promptsync.py", ["--load", "source"])
    tests = [args for _, args in plan if args.stage == "test"]  # TPT+MaPLe: the source's prompts
    assert tests and all(a.load.endswith("checkpoint.pt") and a.loss == "tpt" for a in tests)


def test_plan_help_unknown_dataset_and_missing_root_say_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps the help at the terminal's width
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "Protocols" in text and "base-to-new" in text
    assert "python sweep.py slurm plan.txt" in text and "matplotlib" in text
    with pytest.raises(SystemExit):
        sweep.parse_args(["plan", "--help"])
    text = capsys.readouterr().out
    assert "Options after `--` go to every command" in text and "-- --cocoop" in text
    assert "default: 1 2 4 8 16" in text and "default: DATA" in text and "None" not in text
    root = fake_root(tmp_path, ["EuroSAT"])
    argv = ["few-shot", "--method", "coop.py", "--root", root, "--datasets", "Cifar10"]
    with pytest.raises(SystemExit, match="unknown dataset 'Cifar10': use one of ImageNet, "):
        plan_lines(argv, capsys)
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as e:
        plan_lines(["few-shot", "--method", "coop.py", "--root", str(tmp_path / "nope")], capsys)
    assert "--root" in str(e.value) and "\n" not in str(e.value)  # one line, not one per dataset


# ------------------------------------------------------------------------------------------------
# run --index, slurm, parallel: one plan line per task
# ------------------------------------------------------------------------------------------------
def fake_plan(tmp_path, n_datasets=2, seeds=(1, 2, 3), epochs=3, sleep=0.0, stage2=False):
    """A plan of fake runs (FAKE_METHOD) written to plan.txt -> (its path, its run folders)."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_METHOD)
    lines = []
    for d, seed in [(d, s) for d in range(n_datasets) for s in seeds]:
        out = str(tmp_path / "runs" / f"d{d}" / f"seed{seed}")
        opts = ["--dataset", f"d{d}", "--seed", str(seed), "--shots", "16"]
        opts += ["--epochs", str(epochs), "--sleep", str(sleep), "--resume"]
        lines.append(shlex.join([sys.executable, str(fake), *opts, "--out", out]))
    if stage2:  # a test of every stage-1 run (a cross-dataset stage 2)
        for line in list(lines):
            out = shlex.split(line)[-1]
            load = ["--load", os.path.join(out, "checkpoint.pt"), "--out", out + "_test"]
            lines.append(shlex.join([sys.executable, str(fake), "--dataset", "t", *load]))
    plan = tmp_path / "plan.txt"
    plan.write_text("# a comment line is no plan line\n" + "\n".join(lines) + "\n")
    return str(plan), [shlex.split(line)[-1] for line in lines]


def run_sweep(*argv, env=None, **kwargs):
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, **kwargs)


def test_run_index_runs_one_line_checks_its_own_dependency_and_skips_it_when_done(tmp_path):
    plan, outs = fake_plan(tmp_path, n_datasets=1, seeds=(1, 2), stage2=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    early = run_sweep("run", "--index", "3", plan, env=env)  # stage 2 before its stage-1 run
    assert early.returncode == 1 and not os.path.exists(outs[2])
    assert f"plan line 3 loads runs that have not finished: {outs[0]} (plan line 1)" in early.stderr
    assert run_sweep("run", "--index", "1", plan, env=env).returncode == 0
    ok = run_sweep("run", "--index", "3", plan, env=env)  # its own dependency is enough:
    assert ok.returncode == 0, ok.stderr  # seed 2's stage-1 run has not run
    assert os.path.isfile(os.path.join(outs[2], "metrics.json"))
    assert "epoch 3" in open(os.path.join(outs[0], "run.log")).read()  # logged in its folder
    again = run_sweep("run", "--index", "1", plan, env=env)
    assert again.returncode == 0 and "1 finished before, 0 to run" in again.stderr
    assert run_sweep("run", "--index", "9", plan, env=env).returncode != 0
    if fcntl is not None:  # the per-run lock: a task whose run is running elsewhere leaves it
        os.makedirs(outs[1], exist_ok=True)
        with open(os.path.join(outs[1], ".sweep.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = run_sweep("run", "--index", "2", plan, env=env)
        assert "another runner is running it" in busy.stderr
        assert not os.path.isfile(os.path.join(outs[1], "metrics.json"))


def sbatch_options(script):
    """The #SBATCH lines of a script -> {option: value}."""
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line[len("#SBATCH ") :].partition("=")
            options[name] = value
    return options


def fake_slurm(tmp_path):
    """A PATH with an scontrol that notes its arguments (requeue) in scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def task(script, index, tmp_path, **popen):
    """Start the generated script's task body for array task `index`, as sbatch would."""
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_JOB_ID=f"100{index}")
    env.update(PATH=fake_slurm(tmp_path), CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(["bash", script], env=env, text=True, **popen)


def test_slurm_script_is_an_array_of_plan_lines_with_requeue_and_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan, outs = fake_plan(tmp_path, n_datasets=1, seeds=(1, 2), stage2=True)
    argv = ["slurm", plan, "--partition", "gpu", "--throttle", "4", "--time", "2:00:00"]
    argv += ["--setup", "export SWEEP_ENV=activated", "--python", sys.executable, "-o", "job.sh"]
    assert sweep.main(sweep.parse_args(argv)) == 0
    script = open("job.sh").read()
    options = sbatch_options(script)
    assert options["--array"] == "1-2%4"  # stage 1; stage 2 is submitted after it:
    assert "#   sbatch --array=3-4%4 --dependency=afterany:$jid job.sh" in script
    assert options["--partition"] == "gpu" and options["--time"] == "2:00:00"
    assert options["--gres"] == "gpu:1" and options["--mem"] and options["--cpus-per-task"]
    assert "--requeue" in options and options["--signal"] == "B:USR1@300"
    assert os.path.isdir("slurm-logs") and options["--output"].startswith("slurm-logs/")
    assert "export SWEEP_ENV=activated" in script and os.access("job.sh", os.X_OK)
    body = [line for line in script.splitlines() if " run --index " in line]
    assert body == [
        f'{sys.executable} {os.path.join(ROOT, "sweep.py")} run --index "$SLURM_ARRAY_TASK_ID" '
        f"{plan} &"
    ]
    # the task body, run here as SLURM would run tasks 3 (too early), 1, 3 (now), 1 (again)
    runs = [(3, 1), (1, 0), (3, 0), (1, 0)]
    for index, code in runs:
        done = task("job.sh", index, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = done.communicate(timeout=60)
        assert done.returncode == code, err
        if code:  # the task says which of its stage-1 runs is missing
            assert f"loads runs that have not finished: {outs[0]} (plan line 1)" in err
    assert all(os.path.isfile(os.path.join(o, "metrics.json")) for o in (outs[0], outs[2]))
    assert not os.path.exists(tmp_path / "scontrol.log")  # nothing stopped, nothing requeued


def stop_with_sigusr1(process, checkpoint):
    """SIGUSR1 once the run has saved its first epoch (mid-run), as SLURM sends it to the batch
    shell before the time limit."""
    deadline = time.time() + 60
    while not os.path.isfile(checkpoint):
        assert process.poll() is None and time.time() < deadline, "the run never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    return process.wait(timeout=60)


def test_a_task_stopped_by_sigusr1_requeues_and_the_plan_ends_as_if_uninterrupted(
    tmp_path, monkeypatch
):
    """12 fake runs through the generated task body, one stopped mid-run with SIGUSR1 and run
    again (requeued): the same table as the same plan run without a stop."""
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    plan, outs = fake_plan(plain, n_datasets=4, seeds=(1, 2, 3), epochs=4)
    result = sweep.run_plan(sweep.read_plan(plan), workers=2, gpus=[], stream=io.StringIO())
    assert len(result["ok"]) == 12
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    plan, outs = fake_plan(stopped, n_datasets=4, seeds=(1, 2, 3), epochs=4, sleep=0.1)
    argv = ["slurm", plan, "--python", sys.executable, "-o", "job.sh"]
    assert sweep.main(sweep.parse_args(argv)) == 0
    assert sbatch_options(open("job.sh").read())["--array"] == "1-12%8"
    process = task("job.sh", 5, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert stop_with_sigusr1(process, os.path.join(outs[4], "checkpoint.pt")) == 1
    assert "requeued" in process.stdout.read()
    assert open(tmp_path / "scontrol.log").read().split() == ["requeue", "1005"]
    log = open(os.path.join(outs[4], "run.log")).read()
    assert "stopped by SIGUSR1 after epoch" in log and not os.path.exists(outs[4] + "/metrics.json")
    for index in range(1, 13):  # the array (the requeued task 5 among them)
        assert task("job.sh", index, tmp_path).wait(timeout=60) == 0
    assert open(os.path.join(outs[4], "run.log")).read().count("epoch 4") == 1  # resumed
    table = lambda folder: sweep.format_table(sweep.collect(str(folder / "runs")))
    assert table(stopped) == table(plain)
    assert "| fake | ? | Average (d0, d1, d2, d3) | 16 |" in table(plain)


def test_run_passes_sigusr1_to_its_runs_and_a_rerun_continues_them(tmp_path):
    plan, outs = fake_plan(tmp_path, n_datasets=1, seeds=(1, 2), epochs=3, sleep=0.4)
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), "run", plan, "--workers", "2"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    runner = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert stop_with_sigusr1(runner, os.path.join(outs[0], "checkpoint.pt")) == 1
    assert "2 stopped by SIGUSR1 (rerun to resume)" in runner.stderr.read()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "ran 2: 2 finished" in again.stderr
    for out in outs:  # each continued from its checkpoint: 3 epochs in all
        assert [f"epoch {e}" for e in (1, 2, 3)] == re.findall(
            r"^epoch \d", open(out + "/run.log").read(), re.M
        )


def test_parallel_recipe_uses_a_joblog_resumes_failed_jobs_and_pins_a_gpu_per_slot(tmp_path):
    plan, outs = fake_plan(tmp_path, n_datasets=1, seeds=(1, 2), stage2=True)
    lines = sweep.parallel_commands(plan, sweep.read_plan(plan), 2, ["3", "5"], sys.executable)
    assert len(lines) == 2  # stage 1, then stage 2
    for line, indices in zip(lines, (["1", "2"], ["3", "4"])):
        tokens = shlex.split(line)
        assert tokens[:3] == ["parallel", "--jobs", "2"] and "--resume-failed" in tokens
        assert tokens[tokens.index("--joblog") + 1].endswith(".joblog")
        assert tokens[tokens.index(":::") + 1 :] == indices
        template = tokens[tokens.index("--resume-failed") + 1]
        for slot, index in enumerate(indices, 1):  # what parallel runs, job slot by job slot
            command = template.replace("{%}", str(slot)).replace("{}", index)
            assert subprocess.run(["sh", "-c", command], capture_output=True).returncode == 0
    gpu = lambda out: open(out + "/run.log").read().split("gpu ")[1].split()[0]
    assert [gpu(out) for out in outs] == ["3", "5", "3", "5"]


def test_gpus_are_counted_by_index_not_by_nvidia_smi_lines_mig_included(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\nif [ "$1" = "-L" ]; then\n  echo "GPU 0: NVIDIA A100 (UUID: GPU-1)"\n'
        '  echo "  MIG 3g.20gb Device 0: (UUID: MIG-a)"\n  echo "  MIG 3g.20gb Device 1: (UUID: '
        'MIG-b)"\n  echo "GPU 1: NVIDIA A100 (UUID: GPU-2)"\nelse\n  printf "0\\n1\\n"\nfi\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b")  # what the user set is kept
    assert sweep.visible_gpus() == ["MIG-a", "MIG-b"]


# ------------------------------------------------------------------------------------------------
# table: variants, averages, the plan's status, zero-shot on new classes, the papers' numbers
# ------------------------------------------------------------------------------------------------
def write_coop(folder, dataset, seed, acc, **options):
    """A CoOp run as coop.py leaves it: metrics.json and args.json (its options)."""
    args = dict(backbone="RN50", shots=16, seed=seed, n_ctx=None, csc=False, epochs=None)
    args.update(lr=0.002, template=sweep.TEMPLATES[dataset], workers=4, out=str(folder))
    args.update(options)
    write_run(folder, method="coop", backbone="RN50", dataset=dataset, shots=16, seed=seed,
              accuracy={"test": acc})  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args))


def test_runs_with_other_options_are_other_rows_and_paper_settings_are_not(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        write_coop(runs / f"coop/pets/{seed}", "OxfordPets", seed, 80.0 + seed)
        write_coop(runs / f"csc/pets/{seed}", "OxfordPets", seed, 70.0 + seed, csc=True)
        write_coop(runs / f"ep1/pets/{seed}", "OxfordPets", seed, 60.0 + seed, epochs=1)
        # ImageNet's 50 epochs are CoOp's ImageNet setting (the plan's), not a variant
        write_coop(runs / f"coop/imagenet/{seed}", "ImageNet", seed, 60.0, epochs=50)
        write_coop(runs / f"coop/dtd/{seed}", "DescribableTextures", seed, 65.0, workers=0)
    rows = {(r["method"], r["variant"], r["dataset"]): r for r in sweep.collect(str(runs))}
    assert "the same run" not in capsys.readouterr().err  # none dropped
    assert rows[("coop", "", "OxfordPets")]["stats"]["test"][0] == 82.0
    assert rows[("coop", "csc", "OxfordPets")]["stats"]["test"][0] == 72.0
    assert rows[("coop", "epochs=1", "OxfordPets")]["stats"]["test"][0] == 62.0
    assert rows[("coop", "", "ImageNet")]["seeds"] == [1, 2, 3]
    assert rows[("coop", "", "DescribableTextures")]["seeds"] == [1, 2, 3]  # workers: no option
    average = rows[
        ("coop", "", "Average (3 of 11 datasets: ImageNet, OxfordPets, DescribableTextures)")
    ]
    assert average["stats"]["test"][0] == pytest.approx((60 + 82 + 65) / 3)  # the usual variant
    text = sweep.format_table(list(rows.values()))
    assert "| coop [csc] | RN50 | OxfordPets | 16 | 3 | 72.00 ± 0.82 |" in text
    assert "| coop [epochs=1] | RN50 | OxfordPets | 16 | 3 | 62.00 ± 0.82 |" in text
    table = list(csv.DictReader(io.StringIO(sweep.format_table(list(rows.values()), "csv"))))
    assert {r["variant"] for r in table} == {"", "csc", "epochs=1"}


def test_a_few_shot_curve_is_one_row_per_shot_count_whatever_epochs_the_file_picked(tmp_path):
    """coop.py, prograd.py and CLIP-Adapter train 50/100/200 epochs at 1/2-4/8-16 shots, the linear
    probe validates on min(shots, 4) shots, and args.json records them resolved: no variants."""
    runs = tmp_path / "runs"
    for shots, epochs in [(1, 50), (2, 100), (4, 100), (8, 200), (16, 200)]:
        by_shots = dict(coop=dict(epochs=epochs), linear_probe=dict(val_shots=min(shots, 4)))
        by_shots["clip-adapter"] = by_shots["coop"]
        for method, options in by_shots.items():
            method = method.replace("_", "-")
            folder = runs / method / f"{shots}shot"
            write_run(folder, method=method, backbone="RN50", dataset="EuroSAT", shots=shots,
                      seed=1, accuracy={"test": 50.0 + shots})  # fmt: skip
            args = dict(options, method=method) if method != "coop" else options
            (folder / "args.json").write_text(json.dumps(dict(args, shots=shots, lr=0.002)))
    write_coop(runs / "coop-epochs1", "EuroSAT", 1, 40.0, epochs=1)  # a user's choice: a variant
    rows = sweep.collect(str(runs))
    curves = {}
    for r in rows:
        curves.setdefault((r["method"], r["variant"]), []).append(r["shots"])
    assert curves == {
        ("clip-adapter", ""): [1, 2, 4, 8, 16],
        ("coop", ""): [1, 2, 4, 8, 16],
        ("coop", "epochs=1"): [16],
        ("linear-probe", ""): [1, 2, 4, 8, 16],
    }


def test_averages_are_named_by_their_datasets_and_quoted_only_over_the_same_set(tmp_path):
    runs = tmp_path / "runs"
    tip = dict(method="tip-f", backbone="RN50", shots=16, seed=1)
    for name in sweep.DATASETS:
        write_run(runs / "all" / name, **tip, dataset=name, accuracy={"test": 70.0})
        if name != "EuroSAT":
            write_run(runs / "ten" / name, **dict(tip, shots=8), dataset=name,
                      accuracy={"test": 60.0})  # fmt: skip
    rows = {(r["shots"], r["dataset"]): r for r in sweep.collect(str(runs))}
    whole = rows[(16, "Average (11 datasets)")]
    assert whole["stats"]["test"][0] == 70.0 and whole["paper"]["test"][0] == 75.83
    part = rows[(8, "Average (10 of 11 datasets: no EuroSAT)")]
    assert part["stats"]["test"][0] == 60.0 and part["paper"] == {}  # Tip-F's 8-shot: 11 sets
    assert not any(d.startswith("Average (11") for s, d in rows if s == 8)


def test_base_to_new_shows_zero_shot_clip_on_base_and_new_classes_and_its_h(tmp_path):
    runs = tmp_path / "runs"
    b2n = dict(method="cocoop", backbone="ViT-B/16", dataset="EuroSAT", shots=16)
    for seed, (base, new, zs_base, zs_new) in enumerate([(90, 70, 56, 64), (92, 72, 56, 64)], 1):
        write_run(runs / f"s{seed}", **b2n, seed=seed, accuracy={"test": base, "new": new},
                  zero_shot={"test": zs_base, "new": zs_new})  # fmt: skip
    [row] = [r for r in sweep.collect(str(runs)) if r["dataset"] == "EuroSAT"]
    assert row["stats"]["zero-shot new"] == (64.0, 0.0)
    assert row["stats"]["zero-shot H"][0] == pytest.approx(2 * 56 * 64 / (56 + 64))
    text = sweep.format_table([row])
    assert "| zero-shot base | zero-shot new | zero-shot H | base | new | H |" in text
    assert "| cocoop | ViT-B/16 | EuroSAT | 16 | 2 | 56.00 ± 0.00 | 64.00 ± 0.00 | 59.73" in text


def test_table_reads_the_plan_which_runs_are_missing_and_which_failed(tmp_path, capsys):
    plan, outs = fake_plan(tmp_path, n_datasets=1, seeds=(1, 2, 3))
    sweep.run_plan([sweep.read_plan(plan)[0]], gpus=[], stream=io.StringIO())
    os.makedirs(outs[1])
    open(os.path.join(outs[1], "run.log"), "w").write("Traceback ...\n")  # failed
    assert sweep.main(sweep.parse_args(["table", "--plan", plan])) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        f"1 of 3 runs found; missing (not run): {outs[2]}; failed or stopped: {outs[1]} "
        "(see run.log in each)"
    )


def test_the_papers_numbers_are_data_with_a_source_per_entry_and_add_up():
    entries = list(csv.DictReader(io.StringIO(sweep.PAPERS_CSV)))
    assert len(entries) > 100
    for e in entries:  # paper, table, row: every entry says where it is from
        assert e["source"] in sweep.PAPER_SOURCES and e["table"] and e["row"], e
        assert e["dataset"] in [*sweep.DATASETS, *sweep.VARIANTS, *sweep.AVERAGE_KEYS], e
    papers = sweep.read_papers()
    for (setting, method, backbone, shots, dataset), cell in papers.items():
        if "H" in cell:  # H: the harmonic mean of the (averaged) base and new
            assert sweep.harmonic(cell["test"][0], cell["new"][0]) == pytest.approx(
                cell["H"][0], abs=0.011
            )
        covered = sweep.AVERAGES.get(dataset, ())
        means = [papers.get((setting, method, backbone, shots, d), {}).get("test") for d in covered]
        same = all(m and m[1].split("|")[0] == cell["test"][1].split("|")[0] for m in means)
        if covered and same and "test" in cell:  # an average: the mean of its datasets (if the
            # same paper quotes them: TPT's zero-shot CLIP is not Tip-Adapter's)
            assert np.mean([m[0] for m in means]) == pytest.approx(cell["test"][0], abs=0.011)
    # CoCoOp's cross-dataset average here is TPT's Table 2 row, and says so
    [cocoop] = papers[("cross-dataset", "cocoop", "ViT-B/16", 16, sweep.AVG10)].values()
    assert cocoop[0] == 64.63 and cocoop[1] == "tpt|Table 2 (Average)|CoCoOp (TPT's row)"
    assert "not the CoCoOp paper's Table 2" in sweep.PAPER_SOURCES["tpt"]


def test_plot_draws_few_shot_curves_with_the_papers_dashed_and_base_to_new_bars(tmp_path):
    runs = tmp_path / "runs"
    for shots, acc in [(1, 60.0), (2, 64.0), (16, 75.0)]:
        for seed in (1, 2):
            tip = dict(method="tip-f", backbone="RN50", dataset="EuroSAT", shots=shots)
            write_run(runs / f"tip{shots}_{seed}", **tip, seed=seed, accuracy={"test": acc + seed})
    write_run(runs / "zs", method="zeroshot", backbone="RN50", dataset="EuroSAT", seed=1,
              accuracy={"test": 37.0})  # fmt: skip
    write_run(runs / "b2n", method="cocoop", backbone="ViT-B/16", dataset="EuroSAT", shots=16,
              seed=1, accuracy={"test": 90.0, "new": 60.0})  # fmt: skip
    assert sweep.main(sweep.parse_args(["plot", str(runs), "--out", str(tmp_path / "png")])) == 0
    drawn = sweep.plot(sweep.collect(str(runs)), str(tmp_path / "png"))
    few, bars = str(tmp_path / "png/fewshot.png"), str(tmp_path / "png/base-to-new.png")
    assert drawn[few] == [
        "EuroSAT: zeroshot RN50 (marker)",
        "EuroSAT: tip-f RN50",
        "EuroSAT: tip-f RN50 (paper, dashed)",  # Tip-Adapter's 16-shot EuroSAT, quoted
    ]
    assert drawn[bars] == ["EuroSAT: cocoop ViT-B/16"]
    for path in (few, bars):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_fgvc_split_writes_coops_split_file_from_its_variant_lists(tmp_path, capsys):
    import coop

    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "F-16A/B"]  # CoOp: the label is the line in variants.txt
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    images = {"train": [("0001", 0), ("0002", 1), ("0003", 2)], "val": [("0004", 2)]}
    images["test"] = [("0005", 1), ("0006", 0)]
    for part, items in images.items():
        lines = [f"{image} {variants[label]}" for image, label in items]
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
        for image, label in items:
            draw(folder / "images" / f"{image}.jpg", "red")
    assert sweep.main(sweep.parse_args(["fgvc-split", str(folder)])) == 0
    split = json.load(open(folder / "split_zhou_FGVCAircraft.json"))
    assert split["val"] == [["0004.jpg", 2, "F-16A/B"]]
    data = coop.load_dataset(str(folder / "images"), str(folder / "split_zhou_FGVCAircraft.json"))
    assert data["classnames"] == variants and [y for _, y in data["test"]] == [1, 0]
    root = str(tmp_path)  # and the default plans find it
    commands, needs = sweep.plan_commands("few-shot", "coop.py", root, ["FGVCAircraft"])
    assert sweep.missing_paths(needs) == {} and len(commands) == 15


def test_no_function_of_sweep_is_longer_than_60_lines():
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "sweep.py")).read())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if f.name != "parse_args"}
    assert max(long.values()) <= 60, {k: v for k, v in long.items() if v > 60}


def test_coop_stopped_by_sigusr1_in_its_task_resumes_to_the_uninterrupted_result(
    tiny_ckpt, tiny_data, tmp_path, capsys
):
    """The method files' side of the contract, with a real process: coop.py started by a task
    (`run --index`), SIGUSR1 mid-run (its default action ends the method: its last epoch's
    checkpoint.pt stays; the task exits 1), the same task again (--resume): the same metrics as
    the same command never stopped."""
    argv = ["few-shot", "--method", os.path.join(ROOT, "coop.py"), "--datasets", tiny_data]
    argv += ["--shots", "1", "--seeds", "1", "--out", str(tmp_path / "runs"), "--python"]
    argv += [sys.executable, "--", "--backbone", tiny_ckpt, "--epochs", "60", "--workers", "0"]
    [line] = plan_lines(argv, capsys)
    (tmp_path / "plan.txt").write_text(line + "\n")
    out, env = shlex.split(line)[-1], dict(os.environ, CUDA_VISIBLE_DEVICES="")
    whole = shlex.split(line)[:-1] + [str(tmp_path / "whole")]  # the same run, never stopped
    assert subprocess.run(whole, env=env, capture_output=True, timeout=300).returncode == 0
    command = [sys.executable, os.path.join(ROOT, "sweep.py"), "run", "--index", "1"]
    command.append(str(tmp_path / "plan.txt"))
    task = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    assert stop_with_sigusr1(task, os.path.join(out, "checkpoint.pt")) == 1
    assert not os.path.isfile(os.path.join(out, "metrics.json"))
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    resumed, plain = [json.load(open(f"{f}/metrics.json")) for f in (out, tmp_path / "whole")]
    assert resumed["accuracy"] == plain["accuracy"] and resumed["zero_shot"] == plain["zero_shot"]
