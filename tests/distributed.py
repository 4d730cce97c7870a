"""Run a function on N real processes with a gloo process group on CPU (docs/design.md §9).

* one process per rank, forked from a server that has imported torch (``_context``);
  rendezvous through a file (no ports); 60 s collective timeout; RANK / LOCAL_RANK /
  WORLD_SIZE set in each child (DeepSpeed asserts LOCAL_RANK); one thread per process (2 cores);
* rank bodies live in importable modules (pickled by reference);
* a failing rank reports its traceback through the queue and exits with ``os._exit(1)`` without
  barrier/destroy; the parent kills the others and fails the test. A non-zero exit on success
  fails too. TRITON_INTERPRET=1 reaches the children through the environment (conftest.py).
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(fn, rank, world, init_file, q, args, timeout, backend):
    # A hang shows where it hangs: every thread's stack goes to stderr before the parent gives up.
    faulthandler.dump_traceback_later(max(1.0, timeout - 10), exit=False)
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        # bytes, not tensors: torch's queue would share tensor storage through file
        # descriptors that vanish with this process
        buf = io.BytesIO()
        torch.save(result, buf)
        q.put((rank, "ok", buf.getvalue()))
        q.close()
        q.join_thread()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
        q.close()
        q.join_thread()
        os._exit(1)


# What the fork server imports once: each rank is then forked from it ready, instead of importing
# torch and DeepSpeed itself (about 4 s of CPU per process, two per test, some forty tests).
# Nothing in the server runs a tensor op or touches CUDA, so forking it is safe (OpenMP and
# CUDA are not started); an import that fails there is skipped and happens in the rank.
_PRELOAD = ["torch", "torch.distributed", "tiedadam", "deepspeed", "ds_ranks", "fsdp_ranks",
            "rng_ranks", "placement_ranks"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def run_ranks(fn, *args, world: int = 2, timeout: float = 300.0, backend: str = "gloo") -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the results by rank."""
    ctx = _context()
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        procs = [ctx.Process(target=_child, args=(fn, r, world, init_file, q, args, timeout, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, []
        try:
            while len(results) + len(errors) < world:
                try:
                    rank, status, payload = q.get(timeout=timeout)
                except queue.Empty:
                    errors.append(f"timed out after {timeout:.0f} s waiting for ranks "
                                  f"{sorted(set(range(world)) - set(results))}")
                    break
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            if errors:
                for p in procs:
                    p.kill()
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError("\n".join(errors))
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"ranks exited with {codes}"
        return [results[r] for r in range(world)]
