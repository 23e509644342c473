"""Keep the shared blocks of the method files identical to their canonical copy.

A shared block is fenced in every file that has it; its first line names the canonical file
(coop.py for most blocks):
    # --- shared: appendix (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
    ...
    # --- end shared: appendix ---
  python tools/sync_shared.py --check   # list the blocks that differ (exit 1 if any)
  python tools/sync_shared.py --write   # rewrite every copy from its canonical one
  python tools/sync_shared.py --write --only vpt.py   # rewrite the copies in one file only
"""

import argparse
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["zeroshot.py", "coop.py", "prograd.py", "adapter.py", "vpt.py", "promptsync.py"]
BLOCK = re.compile(
    r"^# --- shared: (?P<name>[\w -]+?) \(canonical copy in (?P<home>[\w.]+);.*?\) ---\n"
    r"(?P<body>.*?)^# --- end shared: (?P=name) ---$",
    re.M | re.S,
)


def blocks(text):
    return {m["name"]: m for m in BLOCK.finditer(text)}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="report differing copies, exit 1 if any")
    p.add_argument("--write", action="store_true", help="rewrite the copies from the canonical")
    p.add_argument("--only", default=None, help="check or rewrite this one file (e.g. vpt.py)")
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    texts = {}
    for name in FILES:
        if os.path.isfile(os.path.join(args.root, name)):
            with open(os.path.join(args.root, name)) as f:
                texts[name] = f.read()
    canonical, differ = {}, []  # block name -> (home file, body)
    for name, text in texts.items():
        for block, m in blocks(text).items():
            home = canonical.setdefault(block, (m["home"], None))[0]
            if home != m["home"]:
                differ.append(f"{name}: block {block!r} names {m['home']} as canonical, not {home}")
            if name == home:
                canonical[block] = (home, m["body"])
    missing = [b for b, (home, body) in canonical.items() if body is None]
    if missing:
        sys.exit(f"blocks {missing} have no canonical copy in the file their fences name")
    for name, text in texts.items():
        if args.only not in (None, name):
            continue
        found = blocks(text)
        for block, m in sorted(found.items(), key=lambda kv: -kv[1].start()):  # from the end
            home, body = canonical[block]
            if name != home and m["body"] != body:
                diff = difflib.unified_diff(body.splitlines(), m["body"].splitlines(),
                                            f"{home} [{block}]", f"{name} [{block}]",
                                            lineterm="", n=1)  # fmt: skip
                differ.append("\n".join(diff))
                text = text[: m.start("body")] + body + text[m.end("body") :]
        if args.write and text != texts[name]:
            with open(os.path.join(args.root, name), "w") as f:
                f.write(text)
    if differ and not args.write:
        print("\n".join(differ))
        print(f"{len(differ)} shared block(s) differ; run python tools/sync_shared.py --write")
        return 1
    print("shared blocks rewritten" if args.write and differ else "shared blocks are identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
