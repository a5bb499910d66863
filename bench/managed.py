"""W4 at the managed level: the library owns the KV cache (packinfer_pool_*).

An engine on the managed API builds W4 like this: one sequence holds the 4096-token shared prefix;
64 sequences are forks of it (its pages shared, not copied); each fork's own tokens are appended
a page at a time, round-robin over the forks, as decode steps grow all sequences together — so
their pages interleave in the pool, as after a while of serving. The pool then detects the
shared prefix itself when a step is planned. `relayout` makes each execution group's KV
contiguous (prefix once, then each member's pages with headroom): the group-contiguous layout
of the paper, measured on/off by the harnesses.

Both harnesses use this with their own arrays: the K/V rows written are gathered from the
kernel-level W4 cache, so the managed run computes the same function on the same values and is
checked against the same reference.
"""

import numpy as np


def w4_rows(w):
    """Slots (in the kernel-level cache) of the prefix's keys, and of every request's own keys in
    request order: the rows to write into the pool's parent sequence and into the forks."""
    prefix_len, members = w.prefix_groups[0]
    if list(members) != list(range(w.batch_size)):
        raise ValueError("W4's managed build expects one prefix group of every request")
    slots = w.kv_slots()
    prefix = slots[0][:prefix_len]
    own = np.concatenate([s[prefix_len:] for s in slots])
    return prefix, own, w.kv_lens - prefix_len


def build_w4_pool(ctx, w, shape, prefix_k, prefix_v, own_k, own_v, stream=0, headroom_pages=2):
    """A pool holding W4 (see the module comment); `prefix_k/v` and `own_k/v` are pointers to
    contiguous `[tokens, kv_heads, head_dim]` rows (w4_rows order). Returns (pool, fork ids)."""
    prefix_len, members = w.prefix_groups[0]
    own_lens = [int(n) for n in (w.kv_lens - prefix_len)]
    ps = w.page_size
    needed = prefix_len // ps + sum(-(-n // ps) for n in own_lens)
    # Room for the relayout to copy every group once more, plus headroom for each member.
    num_pages = 3 * needed + len(members) * (headroom_pages + 2) + 64
    pool = ctx.pool(1, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, shape.packinfer_dtype, w.causal,
                    num_pages, ps, headroom_pages, float(shape.sm_scale))
    try:
        parent = pool.sequence()
        pool.append(parent, prefix_len, stream)
        pool.write_kv(0, [parent], [prefix_len], prefix_k, prefix_v, stream)
        forks = [pool.fork(parent, prefix_len, stream) for _ in members]
        remaining = list(own_lens)
        while any(remaining):
            for i, n in enumerate(remaining):
                if n:
                    step = min(ps, n)
                    pool.append(forks[i], step, stream)
                    remaining[i] -= step
        pool.write_kv(0, forks, own_lens, own_k, own_v, stream)
        return pool, forks
    except Exception:
        pool.destroy()
        raise
