"""FL overhead: simulator round wall time vs the pure local compute of that round.

Usage: python bench/bench_fl_overhead.py [--task skin2d] [--mode npfl] [--sites 3 8 16] [--rounds 3]
                                         [--timeout 300]

Per site count it runs the tiny job (tests' TINY settings: 6 training / 3 validation
cases of 32x32, 1 local epoch, batch 3) in ``nvflare simulator`` with one client thread per site
(-t N, OMP_NUM_THREADS=1), reads each round's wall time from the
server log ("Round r started" -> "Round r finished"; round 0 is left out: it includes data
generation and dataset caching), and compares it with the pure local compute of a round
measured in this process with the same LocalTrainer settings and 1 torch thread: per site
validate(global) + train + validate(local), times the number of sites divided by
min(threads, CPU cores) (the ideal time of the sites' compute run concurrently).

overhead ratio = median round wall time / local compute per round (1.0 = no FL overhead).

Memory: the simulator's process tree (server, one worker process per client thread) is
sampled every 0.5 s with psutil (an nvflare dependency): peak of the summed RSS (shared
pages count once per process, so this over-states the machine's use a little) and the
largest single process. Growth with sites: round time and peak RSS per site, relative to
the smallest site count run (<= 1.0: at most linear).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from _machine import machine  # bench/ is on sys.path when a script runs
from adpfl.experiments.compare import TINY_EXECUTOR
from adpfl.flare.jobs import export_job

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Round (\d+) (started|finished)\.")


def round_times(log: Path) -> dict:
    start, end = {}, {}
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            (start if m.group(3) == "started" else end)[int(m.group(2))] = t
    return {r: end[r] - start[r] for r in start if r in end}


def local_compute_per_site(task: str, executor: dict, repeats: int = 3) -> float:
    from adpfl.data.datalist import load_site_datalist
    from adpfl.data.synthetic import ensure_site_data
    from adpfl.tasks.base import get_task
    from adpfl.tasks.network import TaskNetwork
    from adpfl.training import LocalTrainer, TrainConfig

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="adpfl_bench_fl_")
    ensure_site_data(task, root, "site-1", num_train=executor["num_train"], num_val=executor["num_val"],
                     size=executor["image_size"], seed=0)
    trainer = LocalTrainer(get_task(task), load_site_datalist(root, "site-1", task=task),
                           TrainConfig(local_epochs=executor["local_epochs"], batch_size=executor["batch_size"],
                                       learning_rate=0.002, image_size=executor["image_size"], device="cpu"))
    model = TaskNetwork(task)
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        trainer.evaluate(model)
        trainer.train(model)
        trainer.evaluate(model)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def _tree_rss(proc) -> tuple[int, int]:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(rss), max(rss, default=0)


def run_sim(task, mode, sites, rounds, timeout, threads) -> dict:
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix=f"adpfl_bench_fl{sites}_"))
    job = export_job(task, mode, str(tmp / "jobs"), num_rounds=rounds, min_clients=sites,
                     executor=dict(TINY_EXECUTOR))
    env = dict(os.environ, ADPFL_DATA_ROOT=str(tmp / "data"), OMP_NUM_THREADS="1")
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    t0 = time.perf_counter()
    peak_total = peak_one = 0
    with open(tmp / "simulator.out", "w") as out:
        proc = subprocess.Popen([nvflare, "simulator", job, "-w", str(tmp / "ws"), "-n", str(sites),
                                 "-t", str(threads)], env=env, stdout=out, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        rc = None
        while rc is None:
            total, one = _tree_rss(ps)
            peak_total, peak_one = max(peak_total, total), max(peak_one, one)
            if time.perf_counter() - t0 > timeout:
                for child in ps.children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
                rc = "timeout"
                break
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                rc = None
    wall = time.perf_counter() - t0
    log = tmp / "ws" / "server" / "log.txt"
    rt = round_times(log) if log.is_file() else {}
    return {"rc": rc, "wall": wall, "rounds": rt, "dir": str(tmp), "peak_rss": peak_total, "peak_rss_one": peak_one}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="skin2d")
    ap.add_argument("--mode", default="npfl")
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="per simulator run, seconds")
    ap.add_argument("--threads", type=int, default=0, help="simulator client threads (default: one per site; "
                    "fewer than sites makes the simulator swap client processes, ~10 s per swap)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    per_site = local_compute_per_site(args.task, TINY_EXECUTOR)
    print(f"local compute per site per round (validate + train + validate, tiny {args.task}, 1 thread): "
          f"{per_site:.2f} s")
    base = None
    for n in args.sites:
        threads = args.threads or n
        r = run_sim(args.task, args.mode, n, args.rounds, args.timeout, threads)
        later = [v for k, v in sorted(r["rounds"].items()) if k >= 1]
        if r["rc"] != 0 or not later:
            print(f"{n} sites: no measurement (simulator {r['rc']} after {r['wall']:.0f}s, rounds {r['rounds']}); "
                  f"see {r['dir']}")
            continue
        wall = statistics.median(later)
        # sites run concurrently on the machine's cores: ideal compute time of the round
        compute = per_site * n / max(1, min(threads, os.cpu_count() or 1))
        print(f"{n} sites ({args.mode}, -t {threads}): round wall time median {wall:.2f} s "
              f"over rounds 1..{args.rounds - 1} "
              f"(round 0 with set-up: {r['rounds'].get(0, float('nan')):.2f} s), local compute {compute:.2f} s, "
              f"FL overhead ratio {wall / compute:.2f}; whole simulator run {r['wall']:.0f} s; peak RSS of the "
              f"simulator's processes {r['peak_rss'] / 2**30:.2f} GiB (largest one {r['peak_rss_one'] / 2**20:.0f} "
              f"MiB)", flush=True)
        if base is None:
            base = (n, wall, r["peak_rss"])
        else:
            k = n / base[0]
            print(f"  {n} vs {base[0]} sites ({k:.2f}x the sites): round time {wall / base[1]:.2f}x, peak RSS "
                  f"{r['peak_rss'] / base[2]:.2f}x; per site {wall / base[1] / k:.2f}x and "
                  f"{r['peak_rss'] / base[2] / k:.2f}x (<= 1: at most linear)", flush=True)


if __name__ == "__main__":
    main()
