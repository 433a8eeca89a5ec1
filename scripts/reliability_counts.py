"""Run the probe (tests/test_reliability.py) and count its cases per class, for docs/reliability.md.

Classes are the probe's section headings (the comment line under each ``# ----`` rule); each
collected case (a parametrisation counts once) is counted in the section its test function is
defined in, as passed or not. Run from the repository root:
``python scripts/reliability_counts.py [--messages]`` (about 15 s on one core); ``--messages``
also lists the one-line message each case answered.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

PROBE = Path("tests/test_reliability.py")


def sections() -> dict[str, str]:
    """test function name -> section heading, from the probe's comment rules."""
    owner, current, lines = {}, "", PROBE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# ----") and index + 1 < len(lines) and lines[index + 1].startswith("# "):
            current = lines[index + 1][2:].strip()
        match = re.match(r"def (test_\w+)\(", line)
        if match and current:
            owner[match.group(1)] = current
    return owner


def main() -> int:
    owner = sections()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "probe.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", str(PROBE), "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
             "-o", "junit_logging=system-out"],
            check=False, stdout=subprocess.DEVNULL,
        )
        cases = ET.parse(report).getroot().iter("testcase")
        total, passed, messages = Counter(), Counter(), []
        for case in cases:
            function = case.get("name").split("[")[0]
            out = "".join(child.text or "" for child in case if child.tag == "system-out")
            messages += [f"{case.get('name')}: {line.split('probe message: ', 1)[1]}"
                         for line in out.splitlines() if line.startswith("probe message: ")]
            section = owner.get(function, "other")
            total[section] += 1
            passed[section] += not any(child.tag in ("failure", "error", "skipped") for child in case)
    print("| class | cases | passing |")
    print("|---|---:|---:|")
    for section in dict.fromkeys(owner.values()):
        print(f"| {section} | {total[section]} | {passed[section]} |")
    print(f"| **all** | **{sum(total.values())}** | **{sum(passed.values())}** |")
    if "--messages" in sys.argv:
        print("\n" + "\n".join(messages))
    return 0 if total == passed else 1


if __name__ == "__main__":
    sys.exit(main())
