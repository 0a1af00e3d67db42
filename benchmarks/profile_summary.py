"""Summarise a py-spy raw profile (`py-spy record -f raw`): leaf frames and inclusive shares of the
samples whose stack passes through a given frame. Usage: profile_summary.py FILE THREAD_SUBSTRING FRAME_SUBSTRING."""
import collections
import sys

path, thread, must = sys.argv[1], sys.argv[2], sys.argv[3]
tot = 0
leaf = collections.Counter()
incl = collections.Counter()
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    fr = stack.split(";")
    if thread not in fr[0] or not any(must in f for f in fr):
        continue
    n = int(n)
    tot += n
    leaf[fr[-1][:130]] += n
    for f in set(fr):
        if "lightning_llm_inst" in f or "lightning/pytorch" in f or "torch/" in f:
            incl[f[:130]] += n
print("samples", tot)
for k, v in leaf.most_common(25):
    print(f"{v / tot:.3f} {k}")
print("--- inclusive")
for k, v in incl.most_common(45):
    print(f"{v / tot:.3f} {k}")
