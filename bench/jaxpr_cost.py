"""What a program reads of its parameters, and its matmul FLOPs, counted on its jaxpr.

XLA's `cost_analysis()` cannot say whether a step reads only the routed experts: it counts every gather's
whole operand (all 128 experts) and each while-loop body once. This counts on the jaxpr, before XLA:

- Reads: each parameter leaf is a source whose bytes are what reading all of it costs (E4M3 bits 1 byte per
  value). Views keep a value a source: slices and gathers (their share of the source), reshapes, converts,
  bitcasts, transposes, and the loop plumbing (a scan's per-layer slice, a loop's constants). Any other
  operation that consumes a source reads it, once per use site and loop iteration. So a step that gathers 4
  experts reads 4 experts' bytes; one that converts a layer's whole expert stack reads all of it.
- FLOPs: 2 x output size x contraction size of every dot_general and ragged_dot.
- Loops: a scan multiplies its body by its length; a while loop's trip count is not in the program, so its
  body counts `while_trips` times (default 1) and is reported in `dynamic`: the caller adds what its
  iterations read (the cache blocks of attention, the experts of the routed loop).

What is not counted: activations and the cache (the caller adds the cache bytes a step reads: the filled
slots), and writes. At decode both are small beside the weights.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
from jax.extend.core import Literal
import numpy as np

# primitives whose output is a view of (part of) their first operand
VIEWS = {"gather", "dynamic_slice", "slice", "squeeze", "reshape", "convert_element_type", "bitcast_convert_type",
         "transpose", "expand_dims", "broadcast_in_dim", "copy", "copy_p", "reduce_precision", "index_in_dim",
         "dynamic_index_in_dim", "sharding_constraint", "optimization_barrier"}
DOTS = {"dot_general", "ragged_dot", "ragged_dot_general"}


def _size(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) if hasattr(aval, "shape") else 1


def _nbytes(aval) -> int:
    return _size(aval) * np.dtype(aval.dtype).itemsize if hasattr(aval, "dtype") else 0


class Cost:
    def __init__(self):
        self.reads = 0.0  # bytes of parameters read
        self.flops = 0.0
        self.dynamic = defaultdict(float)  # while-loop bodies: name -> reads per trip (already counted once)


def _sub_jaxprs(eqn):
    """(closed or open jaxpr, the outer vars its invars stand for) for call-like primitives."""
    p = eqn.params
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in p and eqn.primitive.name not in ("scan", "while"):
            j = p[key]
            return [(j.jaxpr if hasattr(j, "jaxpr") else j, list(eqn.invars))]
    if eqn.primitive.name == "cond":
        return [(b.jaxpr, list(eqn.invars[1:])) for b in p["branches"]]
    return []


def _walk(jaxpr, src: dict, mult: float, cost: Cost, while_trips: float, label: str):
    """src: var -> bytes it stands for, for values that are (views of) parameters."""
    read_here = set()

    def cost_of(v):
        return None if isinstance(v, Literal) else src.get(v)

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [cost_of(v) for v in eqn.invars]
        if name in DOTS:
            lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                k = math.prod(lhs.shape[i] for i in lc)
            else:
                k = lhs.shape[-1]
            cost.flops += 2.0 * _size(eqn.outvars[0].aval) * k * mult
        if name in VIEWS and ins and ins[0] is not None:
            frac = _size(eqn.outvars[0].aval) / max(1, _size(eqn.invars[0].aval))
            src[eqn.outvars[0]] = ins[0] * min(1.0, frac)
            continue
        if name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            n, nc, ncarry = eqn.params["length"], eqn.params["num_consts"], eqn.params["num_carry"]
            inner = {}
            for i, (outer, iv) in enumerate(zip(eqn.invars, body.invars)):
                c = cost_of(outer)
                if c is None:
                    continue
                if i < nc:
                    inner[iv] = c
                elif i >= nc + ncarry:
                    inner[iv] = c / n
            _walk(body, inner, mult * n, cost, while_trips, label)
            continue
        if name == "while":
            body, nb = eqn.params["body_jaxpr"].jaxpr, eqn.params["body_nconsts"]
            nc = eqn.params["cond_nconsts"]
            inner = {iv: cost_of(outer) for outer, iv in zip(eqn.invars[nc:nc + nb], body.invars[:nb])
                     if cost_of(outer) is not None}
            before = cost.reads
            _walk(body, inner, mult * while_trips, cost, while_trips, label)
            cost.dynamic[f"{label}/while@{id(eqn) % 10000}"] += (cost.reads - before) / max(while_trips, 1e-9)
            continue
        subs = _sub_jaxprs(eqn)
        if subs:
            for sub, outer_vars in subs:
                inner = {}
                for outer, iv in zip(outer_vars, sub.invars):
                    c = cost_of(outer)
                    if c is not None:
                        inner[iv] = c * min(1.0, _size(iv.aval) / max(1, _size(outer.aval)))
                _walk(sub, inner, mult, cost, while_trips, label)
            continue
        for v, c in zip(eqn.invars, ins):
            if c is not None and v not in read_here:
                read_here.add(v)
                cost.reads += c * mult


def program_cost(fn, args, param_args: tuple[int, ...], while_trips: float = 1.0) -> Cost:
    """Reads of the leaves of args[i] for i in param_args (the parameters), and FLOPs, of fn(*args)."""
    closed = jax.make_jaxpr(fn)(*args)
    flat_in = []
    for i, a in enumerate(args):
        leaves = jax.tree.leaves(a)
        flat_in += [(i in param_args, leaf) for leaf in leaves]
    src = {}
    for v, (is_param, leaf) in zip(closed.jaxpr.invars, flat_in):
        if is_param:
            src[v] = float(_nbytes(leaf))
    cost = Cost()
    _walk(closed.jaxpr, src, 1.0, cost, while_trips, fn.__name__ if hasattr(fn, "__name__") else "fn")
    return cost
