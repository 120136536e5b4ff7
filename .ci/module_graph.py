#!/usr/bin/env python3
"""Fail if keygate's top-level modules import each other in a cycle.

An edge A -> B is any `crate::B` path written in a file of module A (src/A.rs or
src/A/**). Prints the graph in dependency order (each module after everything it
uses), so the request's straight line reads top to bottom.
"""
import pathlib, re, sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
edges = {}
for f in src.rglob("*.rs"):
    rel = f.relative_to(src)
    if rel.parts == ("lib.rs",):
        continue
    module = rel.parts[0].removesuffix(".rs")
    text = re.sub(r"//[^\n]*", "", f.read_text())
    used = set(re.findall(r"\bcrate::(\w+)", text))
    # `use crate::{a, b::c}` groups
    for group in re.findall(r"\bcrate::\{([^}]*(?:\{[^}]*\}[^}]*)*)\}", text):
        used |= set(re.findall(r"(?:^|,)\s*(\w+)", group))
    edges.setdefault(module, set()).update(u for u in used if u != module)

modules = sorted(edges)
for m in modules:
    edges[m] = {u for u in edges[m] if u in edges}

# Tarjan's strongly connected components.
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in sorted(edges[v]):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(sorted(comp))
for m in modules:
    if m not in index:
        visit(m)

cycles = [c for c in sccs if len(c) > 1]
for comp in sccs:  # Tarjan emits dependencies first
    for m in comp:
        print(f"{m:10} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
if cycles:
    for c in cycles:
        print("cycle among:", ", ".join(c), file=sys.stderr)
    sys.exit(1)
print(f"{len(modules)} modules, acyclic")
