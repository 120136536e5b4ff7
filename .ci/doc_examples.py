#!/usr/bin/env python3
"""Counts the public types whose docs lead with an example that sends a request through the layer.

A type counts when its doc comment, or a `docs/*.md` guide `include_str!`-ed onto it, contains a
`oneshot(` call. Prints the count and the types still without one; `--strict` fails unless all have one.
"""
import pathlib, re, sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
types = []
for f in sorted(src.rglob("*.rs")):
    text = f.read_text()
    for m in re.finditer(r"^pub (struct|enum|trait) (\w+)", text, re.M):
        block = []
        for line in reversed(text[: m.start()].rstrip("\n").split("\n")):
            s = line.strip()
            if s.startswith(("///", "#[", ")]", "not(", "doc =")):
                block.append(s)
            else:
                break
        docs = "\n".join(block)
        for path in re.findall(r'include_str!\("([^"]+)"\)', docs):
            docs += (f.parent / path).read_text()
        types.append(("oneshot(" in docs, m.group(2)))
done = [name for ok, name in types if ok]
print(f"{len(done)} of {len(types)} public types lead with a request-sending example")
missing = [name for ok, name in types if not ok]
if missing:
    print("without:", ", ".join(missing))
sys.exit(1 if missing and "--strict" in sys.argv else 0)
