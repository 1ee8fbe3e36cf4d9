"""The A/B regression gate: two revisions of the implementations measured side by side.

`condconv-bench gate ab REF` checks out `REF` in a git worktree, loads its
implementations and the working tree's in the same worker processes (`aliases`), times each
case's two versions in the same interleaved rounds (`paired`) and counts their instructions
under callgrind (`instructions`), then decides per case (`verdict`). Comparing with a baseline
made earlier, elsewhere, cannot judge latency: machines of one CPU label differ by 1.3–2× and
in which strategy they favour. Measured side by side on one runner, the machine cancels out.
"""
