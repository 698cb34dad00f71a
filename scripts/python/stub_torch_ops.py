"""Makes tch's generated C++ shim compile against an older libtorch: every wrapper (`atg_...`) that the compiler
rejects (an op the older libtorch does not have, or has with another signature) gets a body that raises "not in
this libtorch" instead. Run by scripts/gpu-bundle.sh until the shim compiles. radit calls none of these ops.

Usage: stub_torch_ops.py SHIM.cpp ERRORS.txt   (ERRORS: the compiler's output; prints how many wrappers it stubbed)
"""
import re
import sys

shim, errors = sys.argv[1], sys.argv[2]
lines = open(shim).read().split("\n")
bad = {int(m.group(1)) for m in re.finditer(r"torch_api_generated\.cpp:(\d+):\d+: error", open(errors).read())}
stubbed = set()
for line_no in sorted(bad):
    i = line_no - 1
    # The wrapper that holds this line: the nearest `... atg_NAME(...) {` above it, up to its closing `}` line.
    start = next(k for k in range(i, -1, -1) if re.match(r"^\S.*\batg_\w+\(.*\{\s*$", lines[k]))
    end = next(k for k in range(i, len(lines)) if lines[k] == "}")
    if start in stubbed:
        continue
    stubbed.add(start)
    name = re.search(r"\b(atg_\w+)\(", lines[start]).group(1)
    lines[start + 1 : end] = [
        "  PROTECT(",
        f'    throw std::runtime_error("{name}: this op is not in the libtorch radit was built against");',
        "  )",
    ] + [""] * (end - start - 4)  # keep the line count, so later error line numbers still point where they did
open(shim, "w").write("\n".join(lines))
print(len(stubbed))
