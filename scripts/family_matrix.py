"""Run the family matrix (tests/test_families.py) and print it as a table: family x check, largest difference.

    python scripts/family_matrix.py            # runs the tests, then prints markdown
    python scripts/family_matrix.py --from results.xml

Each cell is the largest difference the test recorded (``record_property``), or ``FAIL`` / ``refused``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {"test_plain_forward_is_the_models_own": "idle = own model (bit-identical)",
          "test_prefill_statistics_equal_eager_patterns": "prefill stats vs HF eager",
          "test_decode_statistics_past_the_window": "decode stats past the window",
          "test_edits_equal_a_reference_from_the_modeling_file": "zero/uniform/ACT vs own eager (rel.)",
          "test_left_padded_rows_equal_single_rows": "left-padded rows = single (rel.)",
          "test_models_that_bypass_attention_interface_are_refused": "refused at install"}


def table(xml_path: Path) -> str:
    cells: dict[str, dict[str, str]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        m = re.match(r"(\w+)\[(\w+)\]", case.get("name", ""))
        if not m or m.group(1) not in CHECKS:
            continue
        test, family = m.groups()
        failed = case.find("failure") is not None or case.find("error") is not None
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        value = next(iter(props.values()), None)
        cell = "FAIL" if failed else ("refused" if "refused" in test else f"{float(value):.1e}" if value else "pass")
        cells.setdefault(family, {})[test] = cell
    head = "| family | " + " | ".join(CHECKS.values()) + " |"
    rule = "|" + "---|" * (len(CHECKS) + 1)
    rows = [f"| {fam} | " + " | ".join(c.get(t, "") for t in CHECKS) + " |" for fam, c in cells.items()]
    return "\n".join([head, rule, *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="xml", type=Path, help="an existing pytest --junitxml file")
    args = ap.parse_args(argv)
    xml = args.xml
    if xml is None:
        xml = Path(tempfile.mkdtemp()) / "families.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py",
                        f"--junitxml={xml}", "-o", "junit_logging=no"], cwd=ROOT, check=False)
    print(table(xml))
    return 0


if __name__ == "__main__":
    sys.exit(main())
