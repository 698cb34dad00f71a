"""Fails if radit's code calls a tch op whose C++ wrapper the GPU bundle stubs out.

The GPU bundle (scripts/gpu-bundle.sh) builds radit against torch 2.11's libtorch, against which some of tch's
generated wrappers do not compile; those are stubbed to throw "not in this libtorch". This check maps each stubbed
wrapper (`atg_NAME`, listed in scripts/gpu-stubbed-ops.txt) to the tch methods that call it (`f_NAME` and `NAME`,
found in tch's generated sources as Cargo.lock pins them) and looks for calls of those methods in every Rust file
of the repository. Cheap: no libtorch, no build.

Usage: check-stubbed-ops.py STUBBED.txt   (exit 1 naming file, line and method when a call is found)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
stubbed = [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")]
lock = (root / "Cargo.lock").read_text()
m = re.search(r'name = "tch"\nversion = "([^"]+)"', lock)
if not m:
    sys.exit("check-stubbed-ops: Cargo.lock pins no tch")
version = m.group(1)
cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
sources = sorted(cargo_home.glob(f"registry/src/*/tch-{version}/src/wrappers/tensor_fallible_generated.rs"))
if not sources:
    subprocess.run(["cargo", "fetch", "--quiet"], cwd=root, check=True)
    sources = sorted(cargo_home.glob(f"registry/src/*/tch-{version}/src/wrappers/tensor_fallible_generated.rs"))
if not sources:
    sys.exit(f"check-stubbed-ops: tch {version}'s sources are not under {cargo_home}/registry")
generated = sources[0].read_text().split("\n")

# The fallible method around each call of a stubbed wrapper: the nearest `pub fn f_NAME(` above it.
methods = {}
for i, line in enumerate(generated):
    call = re.search(r"\b(atg_\w+)\(", line)
    if not call or call.group(1) not in stubbed:
        continue
    for k in range(i, -1, -1):
        fn = re.match(r"\s*pub fn (f_\w+)", generated[k])
        if fn:
            methods.setdefault(call.group(1), set()).update({fn.group(1), fn.group(1)[2:]})
            break
missing = [s for s in stubbed if s not in methods]
if missing:
    sys.exit(f"check-stubbed-ops: no tch {version} method calls {', '.join(missing)}: is the list for this tch?")

names = sorted(set().union(*methods.values()))
pattern = re.compile(r"(?:\.|::)(" + "|".join(map(re.escape, names)) + r")\s*(?:::<[^>]*>)?\(")
files = subprocess.run(["git", "ls-files", "*.rs"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
found = []
for f in files:
    for n, line in enumerate((root / f).read_text(errors="replace").split("\n"), 1):
        for hit in pattern.finditer(line):
            found.append(f"{f}:{n}: calls {hit.group(1)}, stubbed in the GPU bundle")
if found:
    print("\n".join(found), file=sys.stderr)
    sys.exit(1)
print(f"check-stubbed-ops: none of the {len(names)} tch methods behind the {len(stubbed)} stubbed wrappers is called "
      f"in {len(files)} Rust files")
