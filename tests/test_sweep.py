"""sweep.py: plans are the papers' protocols and parse with each method's own parse_args; the runner
resumes a killed sweep; SLURM and GNU parallel tasks (one plan line each) skip, lock, log, check
their own dependency and survive SIGUSR1; the table's statistics, variants, averages, shard merging
and the papers' numbers; the plots; FGVCAircraft's split file."""

import csv
import importlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

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
    assert lines == [
        f"python coop.py {pets} --shots 1 --seed 1 --resume --backbone ViT-B/16 --out {out}/OxfordPets/"
        "1shot_seed1",
        f"python coop.py {pets} --shots 2 --seed 1 --resume --backbone ViT-B/16 --out {out}/OxfordPets/"
        "2shot_seed1",
        f"python coop.py {sat} --shots 1 --seed 1 --resume --backbone ViT-B/16 --out {out}/EuroSAT/"
        "1shot_seed1",
        f"python coop.py {sat} --shots 2 --seed 1 --resume --backbone ViT-B/16 --out {out}/EuroSAT/"
        "2shot_seed1",
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
        assert run[("ImageNet", 1)].epochs == 50 and run[("EuroSAT", 1)].epochs is None


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


FAKE_METHOD = """import json, os, sys, time
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
os.makedirs(a["--out"], exist_ok=True)
print("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), "threads", os.environ.get("OMP_NUM_THREADS"))
if "--load" in a and not os.path.isfile(a["--load"]):
    sys.exit("started before the run it loads: " + a["--load"])
time.sleep(float(a.get("--sleep", 0)))
if "--fail" in a:
    sys.exit("failing on purpose")
open(os.path.join(a["--out"], "checkpoint.pt"), "w").close()
json.dump({"method": "fake", "dataset": "d", "seed": 1, "accuracy": {"test": 1.0}},
          open(os.path.join(a["--out"], "metrics.json"), "w"))
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
    assert [len(ps.read_predictions([s])) for s in shards] == [4, 4, 4]  # a third each
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
