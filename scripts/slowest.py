#!/usr/bin/env python3
"""Prints the slowest tests of the last `cargo nextest run --profile ci` from its JUnit report (and any failed or
timed-out ones), so CI's log shows where the suite's time goes. Usage: slowest.py [JUNIT_XML] [N]."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "target/nextest/ci/junit.xml")
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    if not path.exists():
        print(f"slowest: no JUnit report at {path} (the tests did not run under nextest)")
        return 0
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        cases.append((float(case.get("time", "0")), case.get("classname", ""), case.get("name", ""), failed))
    total = sum(t for t, *_ in cases)
    print(f"slowest {min(top, len(cases))} of {len(cases)} tests ({total:.0f} s of test time in all):")
    for t, binary, name, failed in sorted(cases, reverse=True)[:top]:
        print(f"  {t:7.1f} s  {binary} {name}{'  FAILED' if failed else ''}")
    failures = [(b, n) for _, b, n, f in cases if f]
    if failures:
        print(f"{len(failures)} failed:")
        for b, n in failures:
            print(f"  {b} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
