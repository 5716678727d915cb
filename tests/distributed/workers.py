"""Worker bodies for the multi-process tests (run by :func:`tests.distributed.spawn.run`).

Every rank builds the same full-sequence float64 tensors from a seeded generator, computes the
one-process oracle with :func:`attnkit.attention` on the whole sequence (forward and backward),
runs :func:`context_parallel_attention` on its shard, and compares its output rows, LSE and the
gradients of its own q, k, v shards with the oracle's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import context_parallel_attention, plan, shard, unshard
from attnkit.distributed.ring import attend_pair

# The partial LSEs attnkit returns are fp32 even for fp64 inputs, so merging partial results is
# exact only to about 1e-7 relative; a wrong pair, offset or gradient shows up as O(1).
TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(seed, B, Hq, Hkv, N, D, pad):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    go = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    gl = torch.randn(B, Hq, N, generator=g, dtype=torch.float64)
    valid = None
    if pad:
        valid = torch.rand(B, N, generator=g) < 0.7
        # The last batch row: every key of the first shard's first chunk padded, so with a short
        # window some rows see no key at all (o = 0, lse = -inf) and others see keys only remotely.
        valid[-1, : pad] = False
    return q, k, v, go, gl, valid


def _loss(o, lse, go, gl):
    # lse enters the loss too (dlse path); rows with lse = -inf contribute nothing.
    return (o * go).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum()


def _check(errors, name, got, want, tol=None):
    if got.shape != want.shape:
        errors.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if torch.isnan(got).any():
        errors.append(f"{name}: NaN")
        return
    ninf_g, ninf_w = torch.isneginf(got), torch.isneginf(want)
    if not torch.equal(ninf_g, ninf_w):
        errors.append(f"{name}: -inf rows differ ({int(ninf_g.sum())} vs {int(ninf_w.sum())})")
        return
    g, w = got[~ninf_g].to(torch.float64), want[~ninf_w].to(torch.float64)
    if not torch.allclose(g, w, **(tol or TOL)):
        rel = float((g - w).norm() / w.norm().clamp(min=1e-300))
        errors.append(f"{name}: max |diff| {float((g - w).abs().max()):.3e}, relative {rel:.2e}")


def run_case(rank, world, case, group=None) -> list[str]:
    """``case = (name, pattern, layout, (B, Hq, Hkv, N, D), pad, seed[, scale])``."""
    name, pattern, layout, (B, Hq, Hkv, N, D), pad, seed, *rest = case
    scale = rest[0] if rest else None
    q, k, v, go, gl, valid = _inputs(seed, B, Hq, Hkv, N, D, pad)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    # the one-process oracle; attend_pair is attnkit.attention with the key mask argument named
    # in one place (it is being renamed)
    o_ref, lse_ref = attend_pair(*ref_in, pattern, scale, valid, "torch")
    _loss(o_ref, lse_ref, go, gl).backward()

    def sh(x, dim=2):
        return shard(x, dim, layout, group=group)

    mine = [sh(t).requires_grad_() for t in (q, k, v)]
    o, lse = context_parallel_attention(*mine, pattern, group=group, layout=layout, scale=scale,
                                        valid_keys=None if valid is None else sh(valid, 1),
                                        backend="torch", return_lse=True)
    _loss(o, lse, sh(go), sh(gl)).backward()
    errors: list[str] = []
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tag = f"[{name} {layout} world={world} rank={rank}]"
    _check(errors, f"{tag} o", o, sh(o_ref))
    _check(errors, f"{tag} lse", lse, sh(lse_ref))
    for nm, mine_t, ref_t in zip(("dq", "dk", "dv"), mine, ref_in, strict=True):
        _check(errors, f"{tag} {nm}", mine_t.grad, sh(ref_t.grad))
    _check(errors, f"{tag} unshard(o)", unshard(o.detach(), 2, layout, group=group), o_ref.detach())
    return errors


def run_cases(rank, world, cases, subgroup_cases=()) -> list[str]:
    """Every case on all ranks; then, if given, ``subgroup_cases`` on the odd ranks only, through
    a process group of those ranks (group ranks differ from global ranks there)."""
    errors: list[str] = []
    for case in cases:
        try:
            errors += run_case(rank, world, case)
        except Exception as e:  # report and go on: the other ranks are in the same case
            errors.append(f"[{case[0]} {case[2]} rank={rank}] raised {type(e).__name__}: {e}")
    if subgroup_cases:
        odd = dist.new_group(list(range(1, world, 2)))  # every rank must take part in new_group
        for case in subgroup_cases if rank % 2 else ():
            try:
                errors += run_case(rank, world, case, group=odd)
            except Exception as e:
                errors.append(f"[subgroup {case[0]} {case[2]} rank={rank}] raised {type(e).__name__}: {e}")
    return errors


def count_sends(rank, world, pattern, layout, shape, pad) -> dict:
    """Bytes this rank posts with isend in one forward and one backward, counted at the
    torch.distributed call, with the planner's prediction."""
    B, Hq, Hkv, N, D = shape
    counted = {"fwd": 0, "bwd": 0, "peers_fwd": set(), "peers_bwd": set()}
    real = dist.batch_isend_irecv
    phase = ["fwd"]

    def counting(ops):
        for op in ops:
            if op.op is dist.isend:
                counted[phase[0]] += op.tensor.numel() * op.tensor.element_size()
                counted["peers_" + phase[0]].add(op.peer)
        return real(ops)

    dist.batch_isend_irecv = counting
    try:
        q, k, v, go, gl, valid = _inputs(7, B, Hq, Hkv, N, D, pad)
        mine = [shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
        o = context_parallel_attention(*mine, pattern, layout=layout,
                                       valid_keys=None if valid is None else shard(valid, 1, layout))
        phase[0] = "bwd"
        (o * shard(go, 2, layout)).sum().backward()
    finally:
        dist.batch_isend_irecv = real
    p = plan(pattern, N, world, layout)
    kw = dict(batch=B, kv_heads=Hkv, head_dim=D, element_size=8, padding=pad > 0, grad_element_size=8)
    fwd = p.bytes_sent(rank, **kw)
    return {"counted_fwd": counted["fwd"], "counted_bwd": counted["bwd"], "peers_fwd": counted["peers_fwd"],
            "peers_bwd": counted["peers_bwd"],
            "plan_fwd": fwd, "plan_bwd": p.bytes_sent(rank, backward=True, **kw) - fwd,
            "plan_sends": set(p.sends[rank])}


def rejected(rank, world) -> list[str]:
    """The messages of calls every rank must refuse (``"no error"`` where one went through)."""
    out = []

    def attempt(fn):
        try:
            fn()
        except ValueError as e:
            out.append(str(e))
        else:
            out.append("no error")

    n = 4 + 2 * rank  # rank 0 holds 4 rows, rank 1 holds 6
    q = torch.randn(1, 2, n, 4, dtype=torch.float64)
    attempt(lambda: context_parallel_attention(q, q, q, attnkit.Causal()))
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool) if rank == 0 else None  # only rank 0 passes a mask
    attempt(lambda: context_parallel_attention(q, q, q, attnkit.Causal(), valid_keys=mask))
    meta = q.to("meta")  # a device no backend here serves
    attempt(lambda: context_parallel_attention(meta, meta, meta))
    return out


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=128, max_position_embeddings=128)
    torch.manual_seed(0)  # the same weights on every rank, no download
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def hf_llama(rank, world) -> list[str]:
    """A tiny Llama whose attention runs context-parallel, in both layouts: each rank's logits rows
    and the all-reduced parameter gradients must match the one-process model with transformers'
    own eager attention."""
    import attnkit.distributed.hf as cp_hf

    B, N = 2, 8 * world
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in the second row: its last keys are never attended
    pos = torch.arange(N)[None].expand(B, -1)
    weights = torch.randn(B, N, 128, generator=g, dtype=torch.float64)

    ref = _tiny_llama()
    ref.set_attn_implementation("eager")
    logits_ref = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    (logits_ref * weights).sum().backward()

    errors: list[str] = []
    for layout in ("contiguous", "zigzag"):
        model = _tiny_llama()
        cp_hf.configure(layout=layout)
        model.set_attn_implementation(cp_hf.NAME)
        logits = model(input_ids=shard(ids, 1, layout), attention_mask=shard(mask, 1, layout),
                       position_ids=shard(pos, 1, layout), use_cache=False).logits
        (logits * shard(weights, 1, layout)).sum().backward()
        tag = f"[llama {layout} world={world} rank={rank}]"
        _check(errors, f"{tag} logits", logits.detach(), shard(logits_ref.detach(), 1, layout))
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # data-parallel style: the sequence's gradient is the sum over shards
            # Two layers of fp32-LSE merges (see TOL) on gradients of size ~50: 1e-7 relative.
            _check(errors, f"{tag} grad {name}", grad, p_ref.grad, tol=dict(rtol=1e-5, atol=2e-5))
    return errors
