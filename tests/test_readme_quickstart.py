"""The README's Quickstart prints its "Expected output" on the embedded model."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.slow
def test_the_quickstart_prints_the_expected_output(smol, monkeypatch):
    import probe

    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    expected = re.search(r"Expected output:\n\n```\n(.*?)```", README, re.S).group(1)
    monkeypatch.setattr(probe, "load_model", lambda *a, **k: smol)     # the session's embedded model, loaded once
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md#quickstart", "exec"), {})
    assert out.getvalue() == expected
