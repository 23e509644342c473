"""Keep the shared blocks of the method files identical to their canonical copy in coop.py.

A shared block is fenced in every file that has it:
    # --- shared: data (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
    ...
    # --- end shared: data ---
  python tools/sync_shared.py --check   # list the blocks that differ (exit 1 if any)
  python tools/sync_shared.py --write   # rewrite every copy from coop.py
  python tools/sync_shared.py --write --only vpt.py   # rewrite the copies in one file only
"""

import argparse
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANONICAL = "coop.py"
FILES = ["zeroshot.py", "coop.py", "prograd.py", "adapter.py", "vpt.py", "promptsync.py"]
BLOCK = re.compile(
    r"^# --- shared: (?P<name>[\w ]+?) \(.*?\) ---\n(?P<body>.*?)^# --- end shared: (?P=name) ---$",
    re.M | re.S,
)


def blocks(text):
    return {m["name"]: m for m in BLOCK.finditer(text)}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="report differing copies, exit 1 if any")
    p.add_argument("--write", action="store_true", help="rewrite the copies from coop.py")
    p.add_argument("--only", default=None, help="check or rewrite this one file (e.g. vpt.py)")
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with open(os.path.join(args.root, CANONICAL)) as f:
        canonical = {name: m["body"] for name, m in blocks(f.read()).items()}
    if not canonical:
        sys.exit(f"{CANONICAL}: no shared blocks found")
    differ = []
    for name in FILES:
        path = os.path.join(args.root, name)
        if name == CANONICAL or not os.path.isfile(path) or args.only not in (None, name):
            continue
        with open(path) as f:
            text = f.read()
        found = blocks(text)
        unknown = set(found) - set(canonical)
        if unknown:
            differ.append(f"{name}: blocks {sorted(unknown)} have no canonical copy in {CANONICAL}")
        for block, m in sorted(
            found.items(), key=lambda kv: -kv[1].start()
        ):  # from the end: offsets stay valid
            if block in canonical and m["body"] != canonical[block]:
                diff = difflib.unified_diff(
                    canonical[block].splitlines(),
                    m["body"].splitlines(),
                    f"{CANONICAL} [{block}]",
                    f"{name} [{block}]",
                    lineterm="",
                    n=1,
                )
                differ.append("\n".join(diff))
                text = text[: m.start("body")] + canonical[block] + text[m.end("body") :]
        if args.write:
            with open(path, "w") as f:
                f.write(text)
    if differ and not args.write:
        print("\n".join(differ))
        print(
            f"{len(differ)} shared block(s) differ from {CANONICAL}; "
            "run python tools/sync_shared.py --write"
        )
        return 1
    print(
        "shared blocks rewritten from coop.py"
        if args.write and differ
        else "shared blocks are identical"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
