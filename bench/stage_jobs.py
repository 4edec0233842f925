"""Stages side by side on one thread each, or one at a time on all cores: which trains more images per second?

For each quick loop of bench/machine_limit.py (the same networks, batches and optimisers), the images per second of
one process with torch on --jobs threads against --jobs processes with one thread each, running at the same time
(their images per second added; the processes start timing together, after each has warmed up). The two settings
take turns for --rounds rounds and each keeps its best, so that a burst of other work on the machine falls on both
alike. This is what `make <study>` chooses between: its JOBS and THREADS (Makefile). Run it alone; it prints a
Markdown table of ratios measured in this run.

    python bench/stage_jobs.py [--loops vit,cnn8,...] [--seconds 8] [--rounds 2] [--jobs 2]
"""
import argparse
import multiprocessing as mp
from pathlib import Path
from queue import Empty
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common.cache import available_cpus  # noqa: E402

DEFAULT_LOOPS = "cnn8,cvae,resnet18,resvae,unet,vit,mlpcgan,dcgan,convae,ddpm32,mlpae,mlpcvae"


def worker(name, threads, seconds, barrier, queue):
    """Train loop `name` on `threads` torch threads for about `seconds` after three warm-up steps, starting when every
    process side by side has warmed up (barrier); put images/s."""
    import torch
    torch.set_num_threads(threads)
    import machine_limit
    step, batch = machine_limit.loop(name, channels_last=True)
    for _ in range(3):
        step()
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    queue.put(n * batch / (time.perf_counter() - t0))


def images_per_s(name, processes, threads, seconds):
    """The summed images/s of `processes` processes training `name` at the same time, `threads` threads each."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=worker, args=(name, threads, seconds, barrier, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = []
    while len(rates) < processes:
        try:
            rates.append(queue.get(timeout=5))
        except Empty:
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:  # a worker that died never reports: stop the others rather than wait for ever
                for p in procs:
                    p.terminate()
                raise SystemExit(f"{name}: a worker failed (exit {failed[0]}; its message is above)")
    for p in procs:
        p.join()
    return sum(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", default=DEFAULT_LOOPS, help="comma-separated loops of bench/machine_limit.py")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement (after warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="turns of each setting per loop (the best is kept)")
    p.add_argument("--jobs", type=int, default=available_cpus(),
                   help="processes side by side, and the threads of the one process (default: the cores)")
    a = p.parse_args(argv)
    if a.jobs < 2 or a.rounds < 1 or a.seconds <= 0:
        p.error("--jobs must be at least 2, --rounds at least 1, --seconds positive")
    import torch
    print(f"torch {torch.__version__}, {a.jobs} cores; {a.rounds} turns of {a.seconds:g} s per setting, best kept")
    print(f"\n| loop | 1 process x {a.jobs} threads (images/s) | {a.jobs} processes x 1 thread (images/s, summed) "
          f"| ratio |\n|---|---|---|---|", flush=True)
    for name in [n.strip() for n in a.loops.split(",") if n.strip()]:
        one, side = 0.0, 0.0
        for _ in range(a.rounds):
            one = max(one, images_per_s(name, 1, a.jobs, a.seconds))
            side = max(side, images_per_s(name, a.jobs, 1, a.seconds))
        print(f"| {name} | {one:.0f} | {side:.0f} | {side / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
