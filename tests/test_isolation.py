"""Runtime state belongs to the calling thread or task, never to the shared model (issue 16 item 1).

One thread edits (an intervention, an applied calibration, a collector, a memory budget) while another
runs the same model object plainly at the same moment (a barrier starts every iteration together):
the plain thread's logits must equal a clean model's bit for bit, and the edited thread's its own
single-threaded reference. The same holds for two Streamlit sessions sharing the server's cached model.
"""
import asyncio
import contextvars
import threading

import pytest
import torch

from probe import (InputError, InterventionSpec, SinkCalibration, ZeroAblate, apply, collect_stats, install, intervene,
                   memory_budget)

ITERATIONS = 12
PROMPT = "two sessions share one model object while one of them edits it"


def _run_pair(edited_fn, plain_fn, n=ITERATIONS):
    """Run ``edited_fn`` and ``plain_fn`` in two threads, ``n`` times each, every iteration released together."""
    barrier = threading.Barrier(2, timeout=60)
    out = {"edited": [], "plain": [], "errors": []}

    def loop(name, fn):
        try:
            for _ in range(n):
                barrier.wait()
                with torch.no_grad():
                    out[name].append(fn())
        except BaseException as exc:  # reported by the main thread
            out["errors"].append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=("edited", edited_fn)),
               threading.Thread(target=loop, args=("plain", plain_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not out["errors"], out["errors"]
    assert len(out["edited"]) == len(out["plain"]) == n
    return out


@pytest.mark.parametrize("edit", ["intervene", "apply", "collect_stats"])
def test_a_plain_thread_sees_nothing_of_another_threads_edits(tiny_llama, edit):
    m = tiny_llama
    ids = m.encode(PROMPT)
    spec = InterventionSpec([ZeroAblate(heads=["L0H1", "L1H2"]), SinkCalibration(heads=["L1H0"], beta=0.3)])
    with torch.no_grad():
        clean = m.hf(ids).logits
        with intervene(m, spec):
            edited_ref = m.hf(ids).logits
    assert not torch.allclose(clean, edited_ref)  # the edit is visible where it is active

    def edited():
        if edit == "intervene":
            with intervene(m, spec):
                return m.hf(ids).logits
        if edit == "apply":
            with apply(m, spec):
                return m.hf(ids).logits
        with collect_stats(m) as col, memory_budget(m, 4096):  # the eager engine, tiny chunks
            logits = m.hf(ids).logits
        assert col.result().entropy.shape[-1] == ids.shape[1]
        return logits

    out = _run_pair(edited, lambda: m.hf(ids).logits)
    assert all(torch.equal(p, clean) for p in out["plain"])
    want = clean if edit == "collect_stats" else edited_ref
    assert all(torch.allclose(e, want, atol=1e-5, rtol=0) for e in out["edited"])
    assert install(m.hf).idle


def test_threads_on_the_embedded_model_stay_isolated(smol):
    ids = smol.encode(PROMPT)
    spec = InterventionSpec([ZeroAblate(heads=[f"L{l}H{h}" for l in range(0, 30, 3) for h in range(9)])])
    with torch.no_grad():
        clean = smol.hf(ids).logits
        with intervene(smol, spec):
            edited_ref = smol.hf(ids).logits

    def edited():
        with intervene(smol, spec):
            return smol.hf(ids).logits

    out = _run_pair(edited, lambda: smol.hf(ids).logits, n=4)
    assert all(torch.equal(p, clean) for p in out["plain"])
    assert all(torch.equal(e, edited_ref) for e in out["edited"])


def test_applied_calibration_lives_in_its_context(tiny_llama):
    """apply() is per context: a new thread starts plain, copy_context carries it, remove() elsewhere refuses."""
    m = tiny_llama
    ids = m.encode(PROMPT)
    spec = InterventionSpec([ZeroAblate(heads=["L0H0", "L1H3"])])
    with torch.no_grad():
        clean = m.hf(ids).logits
    handle = apply(m, spec)
    try:
        got = {}
        ctx = contextvars.copy_context()
        with torch.no_grad():
            edited = m.hf(ids).logits
            t = threading.Thread(target=lambda: got.update(fresh=m.hf(ids).logits))
            c = threading.Thread(target=lambda: got.update(copied=ctx.run(m.hf, ids).logits))
            for th in (t, c):
                th.start()
                th.join()
        assert not torch.equal(edited, clean) and torch.equal(got["fresh"], clean)
        assert torch.equal(got["copied"], edited)
        errors = []
        remover = threading.Thread(target=lambda: _catch(errors, handle.remove))
        remover.start()
        remover.join()
        assert len(errors) == 1 and "another thread" in str(errors[0]) and handle.active
    finally:
        handle.remove()
    assert not handle.active
    with torch.no_grad():
        assert torch.equal(m.hf(ids).logits, clean)


def _catch(errors, fn):
    try:
        fn()
    except InputError as exc:
        errors.append(exc)


def test_asyncio_tasks_keep_their_own_interventions(tiny_llama):
    m = tiny_llama
    ids = m.encode(PROMPT)
    spec = InterventionSpec([ZeroAblate(heads=["L0H2"])])
    with torch.no_grad():
        clean = m.hf(ids).logits

    async def edited(started: asyncio.Event, done: asyncio.Event):
        with intervene(m, spec), torch.no_grad():
            started.set()
            await done.wait()  # the plain task runs while this one holds the intervention
            return m.hf(ids).logits

    async def plain(started: asyncio.Event, done: asyncio.Event):
        await started.wait()
        with torch.no_grad():
            logits = m.hf(ids).logits
        done.set()
        return logits

    async def main():
        started, done = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(edited(started, done), plain(started, done))

    e, p = asyncio.run(main())
    assert torch.equal(p, clean) and not torch.equal(e, clean)


def _session(barrier, edit, n, results):
    """A Streamlit page (run by AppTest): the cached model, a calibration applied for this session only."""
    import torch

    from dashboards.common import get_model
    from probe import InterventionSpec, SinkCalibration, ZeroAblate, apply

    model = get_model("tiny-llama")
    ids = model.encode("two sessions share one model object while one of them edits it")
    spec = InterventionSpec([ZeroAblate(heads=["L0H1"]), SinkCalibration(heads=["L1H0", "L1H2"], beta=0.2)])
    out = []
    for _ in range(n):
        barrier.wait()
        with torch.no_grad():
            if edit:
                with apply(model, spec):
                    out.append(model.hf(ids).logits)
            else:
                out.append(model.hf(ids).logits)
    results[edit] = (id(model), out)


def test_two_streamlit_sessions_on_one_cached_model():
    from streamlit.testing.v1 import AppTest

    from dashboards.common import get_model

    model = get_model("tiny-llama")  # the server's cached model, shared by every session
    ids = model.encode(PROMPT)
    with torch.no_grad():
        clean = model.hf(ids).logits
    barrier, results = threading.Barrier(2, timeout=60), {}
    apps = [AppTest.from_function(_session, default_timeout=120, args=(barrier, edit, ITERATIONS, results))
            for edit in (True, False)]
    runs = [threading.Thread(target=app.run) for app in apps]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=300)
    for app in apps:
        assert not app.exception, app.exception
    assert results[True][0] == results[False][0] == id(model)  # one model object for both sessions
    assert all(torch.equal(p, clean) for p in results[False][1])
    assert all(not torch.equal(e, clean) for e in results[True][1])
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, clean)
