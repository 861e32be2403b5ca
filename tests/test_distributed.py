"""Scans on Ray (issue 17 item 2): a local 2-worker pool gives the serial run unit for unit; a worker that dies
loses only its unit; a rerun completes without recomputing what was written. One cluster for the module
(Ray's start-up is slow), workers with one torch thread, like the serial runs they are compared with.
"""
import os
import signal
import sys

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray", reason="the distributed extra is not installed: pip install 'headwise[distributed]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from analyses.distributed import local_cluster

    with local_cluster(8):     # logical CPUs: the module's pool and the workers other tests start must all fit
        yield


@pytest.fixture(scope="module")
def pool(cluster, tiny_llama):
    from analyses.distributed import ModelRecipe, RayExecutor

    with RayExecutor(ModelRecipe("tiny-llama", threads=1), workers=2) as ex:
        ex.start(tiny_llama)
        yield ex


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def grid(n: int):
    from analyses.retrieval import RetrievalConfig

    cells = tuple(("code", 200, round(100 * (i + 0.5) / n, 1)) for i in range(n))
    return RetrievalConfig(cells=cells, mask_cells=cells[:1], k=2, seeds=(0,), max_new_tokens=3)


def _files(folder):
    return {p.relative_to(folder): (p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder / "units").glob("*/*.*")}


def test_local_cluster_listens_on_loopback_only(cluster):
    from analyses.distributed import LOCAL_ENV

    assert all(os.environ[k] == v for k, v in LOCAL_ENV.items())
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    mine = _descendant_sockets(os.getpid())
    assert mine, "found no listening socket of the Ray processes"
    assert {addr for addr, _ in mine} <= {"127.0.0.1"}, mine


def test_local_workers_run_at_the_drivers_priority(cluster):
    """Ray's default worker niceness (15) starves a scan's workers beside any other job on the machine."""
    @ray.remote(num_cpus=1)
    def niceness():
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def test_retrieval_grid_equals_the_serial_run_unit_for_unit(pool, tiny_llama, tmp_path):
    from analyses import run
    from analyses.distributed import diff_units
    from analyses.retrieval import RETRIEVAL

    seen = []
    serial = run(RETRIEVAL, tiny_llama, grid(4), store=tmp_path / "serial", progress=False)
    dist = run(RETRIEVAL, tiny_llama, grid(4), store=tmp_path / "ray", progress=seen.append, executor=pool)
    assert len(_files(tmp_path / "ray")) == len(_files(tmp_path / "serial")) == 4 + 1   # samples, the masking cell
    assert diff_units(tmp_path / "serial", tmp_path / "ray") == []
    pd.testing.assert_frame_equal(serial.to_frame(), dist.to_frame(), check_exact=True)
    samples = [p for p in seen if p.stage == "samples"]
    assert [p.done for p in samples] == [0, 1, 2, 3, 4] and {p.total for p in samples} == {4}


def test_grounding_items_equal_the_serial_run_unit_for_unit(pool, tiny_llama, tmp_path):
    from analyses.distributed import diff_units
    from analyses.grounding import GROUNDING, GroundingConfig
    from analyses.runner import run_stage
    from analyses.units import UnitStore

    cfg, stage = GroundingConfig(limit=4, shard=1, max_new_tokens=3), GROUNDING.stage("items")   # 4 units
    a = run_stage(GROUNDING, stage, tiny_llama, cfg, None, UnitStore(tmp_path / "serial"))
    b = run_stage(GROUNDING, stage, tiny_llama, cfg, None, UnitStore(tmp_path / "ray"), pool)
    assert len(_files(tmp_path / "ray")) == 4 and diff_units(tmp_path / "serial", tmp_path / "ray") == []
    pd.testing.assert_frame_equal(a["df"], b["df"], check_exact=True)


def _kill_one_in_flight(pool, killed):
    def progress(p):
        if p.done == 1 and not killed and pool.in_flight():
            unit, pid = pool.in_flight()[0]
            killed.append((unit, pid))
            os.kill(pid, signal.SIGKILL)
    return progress


def test_a_dead_worker_loses_only_its_unit_which_is_retried(pool, tiny_llama, tmp_path):
    from analyses.distributed import diff_units
    from analyses.retrieval import RETRIEVAL
    from analyses.runner import run_stage
    from analyses.units import UnitStore

    before, killed, stage = set(pool.worker_pids().values()), [], RETRIEVAL.stage("samples")
    run_stage(RETRIEVAL, stage, tiny_llama, grid(5), None, UnitStore(tmp_path / "ray"), pool,
              progress=_kill_one_in_flight(pool, killed))
    assert killed and killed[0][1] in before and killed[0][1] not in pool.worker_pids().values()
    assert len(pool.worker_pids()) == 2                     # a fresh worker replaced it
    run_stage(RETRIEVAL, stage, tiny_llama, grid(5), None, UnitStore(tmp_path / "serial"))
    assert diff_units(tmp_path / "serial", tmp_path / "ray") == [] and len(_files(tmp_path / "ray")) == 5


def test_without_retries_the_lost_unit_is_left_for_the_rerun_and_nothing_written_is_recomputed(pool, tiny_llama,
                                                                                              tmp_path, capsys):
    from analyses import run
    from analyses.distributed import WorkersLostError, diff_units
    from analyses.retrieval import RETRIEVAL

    killed, pool.retries = [], 0
    try:
        with pytest.raises(WorkersLostError, match="1 unit.*rerun the same command"):
            run(RETRIEVAL, tiny_llama, grid(5), store=tmp_path / "ray", executor=pool,
                progress=_kill_one_in_flight(pool, killed))
    finally:
        pool.retries = 1
    written = _files(tmp_path / "ray")
    assert len(written) == 4 and killed                    # every unit but the lost one is saved
    seen = []
    run(RETRIEVAL, tiny_llama, grid(5), store=tmp_path / "ray", progress=seen.append)    # the rerun: serial here
    assert "resumed 4 of 5" in capsys.readouterr().err and seen[0].done == 4
    after = _files(tmp_path / "ray")
    assert {k: after[k] for k in written} == written        # same files, never rewritten
    run(RETRIEVAL, tiny_llama, grid(5), store=tmp_path / "serial", progress=False)
    assert diff_units(tmp_path / "serial", tmp_path / "ray") == []


def test_the_cli_runs_a_scan_on_workers_and_resumes_a_serial_one(cluster, tmp_path, capsys):
    from analyses.cli import main
    from analyses.distributed import diff_units

    flags = ["scan", "retrieval", "--model", "tiny-llama", "--cells", "code:200:25,code:200:75", "--mask-cells",
             "code:200:25", "--k", "2", "--seeds", "0", "--max-new-tokens", "3", "--threads", "1"]
    assert main(flags + ["--out", str(tmp_path / "serial")]) == 0
    assert main(flags + ["--out", str(tmp_path / "mixed"), "--cells", "code:200:25", "--mask-cells", "code:200:25"]) == 0
    capsys.readouterr()
    more = ["--out", str(tmp_path / "mixed"), "--workers", "2", "--force"]      # more cells: --force, a stamped folder
    assert main(flags + more) == 0                                              # resumes the serial unit
    err = capsys.readouterr().err
    assert "starting 2 Ray worker(s)" in err and "resumed 1 of 2" in err
    assert diff_units(tmp_path / "serial", tmp_path / "mixed") == []


def test_workers_must_hold_the_drivers_weights(cluster, tiny_llama):
    from analyses.distributed import ModelRecipe, RayExecutor
    from probe.errors import ModelMismatchError

    with RayExecutor(ModelRecipe("tiny-gpt2"), workers=1) as ex:
        with pytest.raises(ModelMismatchError, match="same model"):
            ex.start(tiny_llama)


def test_without_ray_workers_is_a_clear_error_naming_the_extra(monkeypatch, tmp_path, capsys):
    from analyses.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    rc = main(["scan", "retrieval", "--model", "tiny-llama", "--workers", "2", "--out", str(tmp_path / "x")])
    assert rc == 2 and "headwise[distributed]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()                    # refused before any work


def _descendant_sockets(root: int) -> set[tuple[str, int]]:
    """``(address, port)`` of the TCP sockets listening in ``root``'s descendant processes (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    pids, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            pids.add(c)
            todo.append(c)
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:            # LISTEN
                addr, port = f[1].split(":")
                found.add((_ip(addr, v6), int(port, 16)))
    return found


def _ip(hexaddr: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hexaddr)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = ipaddress.IPv6Address(words)
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return "127.0.0.1" if ip.is_loopback else str(ip)      # ::1 is loopback too


def test_the_scale_benchmark_quick_run(cluster, tmp_path):
    """``bench/scale.py --quick``'s measurement: rates for serial, 1 and 2 workers, each run equal unit for unit."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale_bench", Path(__file__).resolve().parents[1] / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.bench("tiny-llama", 3, 200, tmp_path)
    assert out["units"] == 3 and out["workers_1"]["units_equal_to_serial"] and out["workers_2"]["units_equal_to_serial"]
    assert all(out[k]["units_per_s"] > 0 for k in ("serial", "workers_1", "workers_2")) and out["roundtrip_s"] > 0
    assert out["efficiency_2"] == pytest.approx(out["workers_2"]["units_per_s"] / (2 * out["workers_1"]["units_per_s"]),
                                                abs=2e-3)
