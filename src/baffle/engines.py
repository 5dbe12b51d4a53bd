"""Engines: evaluate L(W + sign * sigma * eps_k) for k < K, fast and within a memory budget.

All engines draw the same directions (``baffle.directions``) and compute the same
numbers up to float32 rounding (``delta``: up to bfloat16 rounding of each change); they
differ in speed and memory.

- ``grouped``: the K perturbed models run *side by side as one model*. The model is
  traced with ``torch.fx`` and interpreted with every activation laid out as
  ``(batch, Kc * channels, ...)``: the first conv/linear sees the shared batch once and
  runs as one layer with Kc times the output channels; later convs run as one grouped
  conv (``groups = Kc``), linears as one ``bmm``; activations, pooling and GroupNorm
  (with Kc times the groups) act on the stacked tensor directly. Supported: Conv2d,
  Linear, GroupNorm, elementwise activations, pooling, Flatten, Identity, residual adds
  (the registry's LeNet and WRN). Anything else raises ``Unsupported``. Under layer
  directions a chunk holds directions of one layer only and perturbs only that layer's
  weights; the layers its perturbation does not reach take their values from one
  unperturbed pass recorded per estimate, so a direction on layer b runs only layer b
  and what comes after it (LeNet: 65% of the dense FLOPs; WRN-10-2: 51%).
- ``delta``: ``grouped``, except that a conv whose input is perturbed (and whose fan-in
  is at least ``DELTA_MIN_FAN_IN``) computes only its O(sigma) change from one unperturbed
  pass recorded per estimate, in bfloat16, and adds it to that pass's float32 output
  (``_Delta``): on a CPU with AMX, LeNet's step in 70% of grouped's time. bfloat16's
  rounding then falls on the change, not on the activation.
- ``vmap``: ``torch.func.vmap`` over ``functional_call``; works for any model.
- ``inplace``: one perturbed model at a time, written *into the model's own parameters*
  module by module: a forward pre-hook snapshots a module's parameters into one scratch
  buffer, regenerates their directions from the seed and adds them in place; the forward
  hook copies the snapshot back (exact, never the +s/-s round trip). Extra memory: one
  module's parameters and one parameter's direction. Requires that every parameter is
  used only inside the forward of the module that owns it (true for the registry models).

``chunk_for`` sizes Kc so that one chunk fits the memory budget (``parse_memory``,
``default_budget``); ``choose_engine`` is the ``auto`` rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import operator
import os
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import vmap

from baffle.directions import DirectionCache, DirectionScheme, directions
from baffle.errors import ConfigError

log = logging.getLogger("baffle.engines")

LossAt = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# draw(ks, p, shape, device) -> directions ks of parameter p, stacked: (len(ks), *shape)
Draw = Callable[[range, int, torch.Size, torch.device], torch.Tensor]


def drawer(dirs: DirectionScheme, seed: int, cache: DirectionCache | None = None) -> Draw:
    """The direction source of one estimate: fresh draws, or a shared ``DirectionCache``."""
    if cache is not None:
        if cache.scheme != dirs:
            raise ValueError("the direction cache was made for another scheme")
        return lambda ks, p, shape, device: cache.directions(seed, ks, p, shape, device)
    return lambda ks, p, shape, device: directions(dirs, seed, ks, p, shape, device)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Perturbations per grouped pass on a CPU under `auto`: wider grouped convs lose to dense
# ones and activations fall out of cache (measured: BENCHMARKS.md, section throughput).
CPU_CHUNK_CAP = 2
# Perturbations per pass from which their losses are taken in one vmap-batched call: on a
# CPU (1 thread) vmap costs about 0.34 ms a call and the loop 0.02 ms a column.
VMAP_LOSSES = 32
_UNBATCHABLE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()  # losses vmap refused


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Full float32 convolutions and matmuls (no TF32) inside the block, restored after.

    cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs: inputs
    keep 10 mantissa bits, a relative error near 1e-3 in the loss. The loss differences
    are O(sigma) = 1e-4 of a loss near 1, so TF32 would bury them; every engine runs
    under this. It changes nothing a CPU computes. Inside the block torch's legacy
    ``allow_tf32`` getters raise (torch >= 2.9 refuses to read a mix of the two APIs); the
    caller's settings, legacy ones included, are back after it.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):  # torch >= 2.9
        flags = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        flags = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved, strict=True):
            setattr(obj, name, value)


class Unsupported(Exception):
    """The grouped engine cannot run this model (an op it does not know)."""


# --------------------------------------------------------------------------- memory
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
          "tb": 10**12, "tib": 1 << 40}


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"800"`` (a bare number is MiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "mib"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"bad memory size {text!r}; write e.g. 512MiB, 2GiB or 1.5GB")
        value, unit = float(m.group(1)), (m.group(2).lower() or "mib")
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"memory size must be > 0 (got {text!r})")
    return n


def available_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes on ``device``: MemAvailable on a CPU, free memory on a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def default_budget(device: torch.device | str = "cpu") -> int:
    """The default budget for the estimator's scratch: a quarter of the free memory."""
    return max(64 << 20, available_memory(device) // 4)


def resolve_budget(max_memory: str | int | float | None, device: torch.device | str) -> int:
    """Bytes of the budget: ``max_memory`` parsed, or ``default_budget`` if None/""/"auto"."""
    if max_memory is None or (isinstance(max_memory, str) and max_memory.strip().lower()
                              in ("", "auto")):
        return default_budget(device)
    return parse_memory(max_memory)


# --------------------------------------------------------------------------- grouped
_ELEMENTWISE = (nn.Hardswish, nn.ReLU, nn.ReLU6, nn.SELU, nn.GELU, nn.SiLU, nn.ELU,
                nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
                nn.Hardsigmoid)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_INPLACE_FN: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Hardswish: F.hardswish, nn.ReLU: F.relu, nn.SELU: F.selu, nn.SiLU: F.silu,
    nn.ReLU6: F.relu6, nn.Hardsigmoid: F.hardsigmoid,
}
_ADDS = (operator.add, torch.add, operator.iadd)
_FLATTENS = (torch.flatten,)


def _pair(v: int | Sequence[int]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


def tiled_max_pool(m: nn.MaxPool2d) -> tuple[int, int] | None:
    """(kh, kw) if ``m`` pools non-overlapping kh x kw tiles, not 1 x 1 (stride = kernel,
    no padding, dilation or indices, floor mode), the case ``max_pool_tiles`` computes."""
    k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    if (len(k) != 2 or k != s or k == (1, 1) or _pair(m.padding) != (0, 0)
            or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices):
        return None  # 1 x 1 too: its tiles would be a view, which later ops may overwrite
    return k[0], k[1]


def max_pool_tiles(h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """out[..., i, j] = max over a < kh, b < kw of h[..., kh*i + a, kw*j + b]: the max
    pool over non-overlapping tiles (floor mode), as kh + kw - 2 elementwise maxima of
    strided views. Bit-identical to ``F.max_pool2d(h, (kh, kw))``, NaN included (both
    propagate it), but without the int64 indices CPU max pooling writes: 2.2x-2.9x faster
    on one AVX-512 core for LeNet's pool (BENCHMARKS.md, section throughput)."""
    rows, cols = h.shape[-2] // kh * kh, h.shape[-1] // kw * kw
    if not (rows and cols):  # a tile larger than the input: max_pool2d's own error
        return F.max_pool2d(h, (kh, kw))
    r = h[..., 0:rows:kh, :cols]
    for a in range(1, kh):
        r = torch.maximum(r, h[..., a:rows:kh, :cols])
    out = r[..., 0::kw]
    for b in range(1, kw):
        out = torch.maximum(out, r[..., b::kw])
    return out


@dataclass
class GroupedPlan:
    """A traced model whose every node the grouped interpreter knows how to run."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    last_use: dict[fx.Node, list[fx.Node]]  # node -> values that die after it runs
    tiles: dict[fx.Node, tuple[int, int]]  # max pools ``max_pool_tiles`` runs on a CPU


def plan(model: nn.Module) -> GroupedPlan:
    """Trace ``model`` and check every node; raise ``Unsupported`` naming the first bad op."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not for this engine"
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__}: {e}") from None
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):  # Identity/eval-Dropout are aliases: splice them out
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"grouped engine needs forward(x) with one input, got {len(placeholders)}")
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Conv2d):
                if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                    raise Unsupported(f"Conv2d with padding {mod.padding!r}/{mod.padding_mode}")
            elif isinstance(mod, nn.Flatten):
                if mod.start_dim != 1 or mod.end_dim != -1:
                    raise Unsupported("Flatten other than Flatten(1, -1)")
            elif not isinstance(mod, (nn.Linear, nn.GroupNorm, *_ELEMENTWISE, *_POOLS)):
                raise Unsupported(f"module {type(mod).__name__} ({node.target})")
        elif node.op == "call_function" and node.target in _ADDS:
            if len(node.args) != 2 or node.kwargs:
                raise Unsupported("add with alpha or more than two operands")
        elif node.op == "call_function" and node.target in _FLATTENS:
            if tuple(node.args[1:]) not in ((1,),) or node.kwargs:
                raise Unsupported("torch.flatten other than flatten(x, 1)")
        elif node.op == "call_method" and node.target == "flatten":
            if tuple(node.args[1:]) != (1,) or node.kwargs:
                raise Unsupported("Tensor.flatten other than flatten(1)")
        else:
            raise Unsupported(f"{node.op} {node.target}")
    order = list(graph.nodes)
    seen: set[fx.Node] = set()
    last_use: dict[fx.Node, list[fx.Node]] = {n: [] for n in order}
    for node in reversed(order):  # a value dies after its last user runs
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                last_use[node].append(arg)
    tiles = {n: tile for n in order if n.op == "call_module"
             and isinstance(modules[n.target], nn.MaxPool2d)
             and (tile := tiled_max_pool(modules[n.target])) is not None}
    return GroupedPlan(graph, modules, last_use, tiles)


class _Stacked:
    """Run one chunk of Kc perturbed models through a plan.

    ``base`` (node -> value of the unperturbed pass) serves every node that no perturbed
    parameter reaches; ``record`` collects those values during an unperturbed run.
    """

    def __init__(self, plan_: GroupedPlan, perturbed: dict[int, torch.Tensor], Kc: int,
                 channels_last: bool = False, *, base: dict[fx.Node, Any] | None = None,
                 record: dict[fx.Node, Any] | None = None) -> None:
        self.plan, self.perturbed, self.Kc = plan_, perturbed, Kc  # id(param) -> (Kc, *shape)
        self.channels_last = channels_last
        self.base, self.record = base, record

    def _reusable(self, node: fx.Node, env: dict[fx.Node, tuple[Any, bool]]) -> bool:
        """``node``'s value is the unperturbed one: no stacked input, no perturbed weight."""
        if self.base is None or node not in self.base:
            return False
        if any(env[a][1] for a in node.all_input_nodes):
            return False
        return not (node.op == "call_module" and any(
            id(p) in self.perturbed
            for p in self.plan.modules[node.target].parameters(recurse=False)))

    def param(self, p: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        if p is None:
            return None, False
        stacked = self.perturbed.get(id(p))
        return (p, False) if stacked is None else (stacked, True)

    def spread(self, t: torch.Tensor | None, stacked: bool) -> torch.Tensor | None:
        """A parameter as Kc stacked copies flattened along dim 0 (perturbed or repeated)."""
        if t is None:
            return None
        if stacked:
            return t.flatten(0, 1)
        return t.repeat(self.Kc, *([1] * (t.dim() - 1)))

    def to_stacked(self, h: torch.Tensor) -> torch.Tensor:
        return h.repeat(1, self.Kc, *([1] * (h.dim() - 2)))

    def conv(self, m: nn.Conv2d, h: torch.Tensor, st: bool,
             node: fx.Node | None = None) -> tuple[torch.Tensor, bool]:
        w, wp = self.param(m.weight)
        b, bp = self.param(m.bias)
        if not (st or wp or bp):
            return m(h), False
        if not st and m.groups != 1:
            h, st = self.to_stacked(h), True
        weight = self.spread(w, wp)
        if self.channels_last and weight is not None:  # oneDNN's fast layout on CPUs
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = self.spread(b, bp)
        groups = m.groups * (self.Kc if st else 1)
        return F.conv2d(h, weight, bias, m.stride, m.padding, m.dilation, groups), True

    def linear(self, m: nn.Linear, h: torch.Tensor, st: bool) -> tuple[torch.Tensor, bool]:
        w, wp = self.param(m.weight)
        b, bp = self.param(m.bias)
        if not (st or wp or bp):
            return m(h), False
        if h.dim() != 2:
            raise Unsupported("Linear on an input that is not (batch, features)")
        Kc, B = self.Kc, h.shape[0]
        assert w is not None
        W = w if wp else w.expand(Kc, *w.shape)  # (Kc, out, in)
        if st:
            hk = h.view(B, Kc, -1).transpose(0, 1)  # (Kc, B, in)
            if b is None:
                out = torch.bmm(hk, W.transpose(1, 2))
            else:
                bias = b if bp else b.expand(Kc, *b.shape)
                out = torch.baddbmm(bias.unsqueeze(1), hk, W.transpose(1, 2))
            return out.transpose(0, 1).reshape(B, -1), True
        out = F.linear(h, W.reshape(-1, W.shape[-1]), self.spread(b, bp))
        return out, True

    def group_norm(self, m: nn.GroupNorm, h: torch.Tensor, st: bool) -> tuple[torch.Tensor, bool]:
        w, wp = self.param(m.weight)
        b, bp = self.param(m.bias)
        if not (st or wp or bp):
            return m(h), False
        if not st:
            h = self.to_stacked(h)
        return F.group_norm(h, m.num_groups * self.Kc, self.spread(w, wp), self.spread(b, bp),
                            m.eps), True

    def add(self, node: fx.Node, a: Any, b: Any) -> tuple[Any, bool]:
        """a + b, written into a stacked operand that dies here where one does (a + b is
        b + a bit for bit): a fresh (B, Kc*C, H, W) sum costs page faults on a CPU."""
        (ta, sa), (tb, sb) = a, b
        if not isinstance(ta, torch.Tensor) or not isinstance(tb, torch.Tensor):
            return ta + tb, sa or sb
        if sa and sb:
            for own, other, arg in ((ta, tb, node.args[0]), (tb, ta, node.args[1])):
                if (own.shape == other.shape and own.dtype == other.dtype
                        and self._may_overwrite(node, arg)):
                    return own.add_(other), True
        if sa == sb:
            return ta + tb, sa
        s, t, arg = (ta, tb, node.args[0]) if sa else (tb, ta, node.args[1])
        # s stacked (B, Kc*C, ...), t shared (B, C, ...); splitting a dim is always a view
        if s.dtype == t.dtype and self._may_overwrite(node, arg):
            s.unflatten(1, (self.Kc, -1)).add_(t.unsqueeze(1))
            return s, True
        return (s.unflatten(1, (self.Kc, -1)) + t.unsqueeze(1)).flatten(1, 2), True

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        env: dict[fx.Node, tuple[Any, bool]] = {}
        out: tuple[torch.Tensor, bool] | None = None
        modules = self.plan.modules
        for node in self.plan.graph.nodes:
            if node.op == "placeholder":
                env[node] = (x, False)
            elif node.op == "output":
                out = env[node.args[0]]
            elif self._reusable(node, env):
                assert self.base is not None
                env[node] = (self.base[node], False)
            elif node.op == "call_module":
                m = modules[node.target]
                h, st = env[node.args[0]]
                if isinstance(m, nn.Conv2d):
                    env[node] = self.conv(m, h, st, node)
                elif isinstance(m, nn.Linear):
                    env[node] = self.linear(m, h, st)
                elif isinstance(m, nn.GroupNorm):
                    env[node] = self.group_norm(m, h, st)
                elif node in self.plan.tiles and h.device.type == "cpu":  # measured there
                    env[node] = (max_pool_tiles(h, *self.plan.tiles[node]), st)
                elif type(m) in _INPLACE_FN and self._may_overwrite(node, node.args[0]):
                    env[node] = (_INPLACE_FN[type(m)](h, inplace=True), st)
                else:  # activations and pools act per channel: stacking is invisible to them
                    env[node] = (m(h), st)
            elif node.target in _ADDS:
                env[node] = self.add(node, env[node.args[0]], env[node.args[1]])
            else:  # flatten(x, 1): (B, Kc*C, H, W) -> (B, Kc*C*H*W) keeps each k contiguous
                h, st = env[node.args[0]]
                env[node] = (h.flatten(1), st)
            if self.record is not None and node.op != "output":
                self.record[node] = env[node][0]
            for dead in self.plan.last_use[node]:
                env.pop(dead, None)
        assert out is not None
        return out

    def _may_overwrite(self, node: fx.Node, arg: Any) -> bool:
        """True if ``node`` may write into its input ``arg``: a value that dies here and is
        a tensor of our own (not x, no view, not a recorded value). Under ``base`` only
        stacked values are overwritten (activations run only on those; ``add`` asks only
        for them), never a reused one, so only the recording pass must not overwrite."""
        if self.record is not None:
            return False
        if not (isinstance(arg, fx.Node) and arg in self.plan.last_use[node]):
            return False
        if arg.op == "call_function":
            return arg.target in _ADDS  # a sum of ours (flatten makes views)
        return (arg.op == "call_module"
                and not isinstance(self.plan.modules[arg.target], nn.Flatten))


def block_chunks(K: int, chunk: int, blocks: tuple[int, ...], n_params: int,
                 cycle: tuple[int, ...] = ()) -> list[tuple[Sequence[int], set[int]]]:
    """The passes of one estimate: (directions, parameter tensors they move).

    Dense directions: ``range(K)`` in chunks, each moving every tensor. With L blocks
    (``DirectionScheme.blocks``), direction k moves only block ``cycle[k mod len(cycle)]``
    (by default k mod L), so each chunk takes directions of one block, ascending, and
    moves only that block's tensors.
    """
    chunk = max(1, chunk)
    if not blocks:
        return [(range(s, min(K, s + chunk)), set(range(n_params))) for s in range(0, K, chunk)]
    scheme = DirectionScheme(blocks=blocks, cycle=cycle)
    out = []
    for b in range(scheme.n_blocks):
        ks = scheme.moving(blocks.index(b), K)
        moved = {i for i, blk in enumerate(blocks) if blk == b}
        out += [(ks[s:s + chunk], moved) for s in range(0, len(ks), chunk)]
    return out


def grouped_losses(
    plan_: GroupedPlan,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: dict[str, torch.Tensor],
    draw: Draw,
    K: int,
    step: float,
    chunk: int,
    blocks: tuple[int, ...] = (),
    reuse: bool = True,
    cycle: tuple[int, ...] = (),
    delta: torch.dtype | None = None,
) -> torch.Tensor:
    """L(W + step * eps_k) for k < K, ``chunk`` perturbed models per grouped pass.

    With ``blocks`` (layer directions; ``cycle`` says which block each direction moves)
    a pass perturbs one block only, so every layer that no perturbed weight reaches
    computes the unperturbed value. With ``reuse`` those
    values come from one unperturbed pass recorded up front (it costs the sum of one
    pass's activations at batch size): a direction on layer b then runs only layer b and
    the layers after it.

    With ``delta`` (a dtype: the delta engine) the unperturbed pass is always recorded and
    each perturbed conv computes only its change from it, in that dtype (``_Delta``).
    """
    if delta is not None and x.device.type == "cpu":
        steady_heap()
    xx, cl = to_channels_last(x), prefer_channels_last(x)
    base: dict[fx.Node, Any] | None = None
    if delta is not None or (blocks and reuse):
        base = {}
        _Stacked(plan_, {}, 1, cl, record=base).run(xx)
    shared: dict[fx.Node, torch.Tensor] = {}  # delta: inputs cast once per estimate
    out = torch.empty(K)
    tensors = list(params.values())
    for ks, moved in block_chunks(K, chunk, blocks, len(tensors), cycle):
        runner: _Stacked
        if delta is None:
            perturbed = {id(p): _shifted(p, draw(ks, i, p.shape, p.device), step)
                         for i, p in enumerate(tensors) if i in moved}
            runner = _Stacked(plan_, perturbed, len(ks), cl, base=base)
        else:  # the steps s e_k themselves, and W + s e_k for the float32 layers
            steps = {id(p): draw(ks, i, p.shape, p.device).mul_(step)
                     for i, p in enumerate(tensors) if i in moved}
            perturbed = {id(p): p.unsqueeze(0) + steps[id(p)] for p in tensors
                         if id(p) in steps}
            assert base is not None
            runner = _Delta(plan_, perturbed, steps, len(ks), cl, base, shared, delta)
        logits, stacked = runner.run(xx)
        if not stacked:
            raise Unsupported("the output does not depend on any perturbed parameter")
        out[list(ks)] = per_k_losses(loss_fn, logits.unflatten(1, (len(ks), -1)), y)
    return out


# --------------------------------------------------------------------------- delta
# Perturbations per delta pass on a CPU: LeNet's step was fastest at 4-8 on a CPU with AMX
# (and slower at 2 and 16); WRN-10-2's at 2-4.
DELTA_CHUNK_CAP = 4
# Convs with fewer multiply-adds per output than this (1x1 shortcuts) run in float32: the
# casts and adds around a bfloat16 change would cost more than they save.
DELTA_MIN_FAN_IN = 400


class _Delta(_Stacked):
    """Run one chunk of Kc perturbed models as their changes from the unperturbed pass.

    A conv whose input is perturbed computes, for each k, with a = W * h + b the
    unperturbed pass's output (recorded once per estimate), D_k = h_k - h its input's
    change and s e_k, s e'_k the weight's and bias's steps:

        (W + s e_k) * h_k + b + s e'_k = a + [(W + s e_k) * D_k + s e_k * h + s e'_k]

    The bracket, the O(sigma) change, runs in ``dtype`` (bfloat16: about 7x float32's speed
    on a CPU with AMX) as two convs: one dense conv of the shared h with the Kc steps
    stacked as output channels, and one grouped conv of the D_k with the W + s e_k added
    into it (``conv_add_``); ``a`` is then added in float32. A fan-in below
    ``DELTA_MIN_FAN_IN`` runs the float32 grouped conv instead. bfloat16's relative
    rounding (2^-9) thus falls on the change, not on the activation: a loss difference
    is off by about that fraction of the changes' size, on top of the float32 rounding
    every engine has (measured against float64: BENCHMARKS.md, throughput, and
    tests/test_delta_engine.py). Everything else (activations, pooling, GroupNorm, adds,
    linears, the loss, and convs on the shared input, which run as in ``_Stacked``) is
    float32.
    """

    def __init__(self, plan_: GroupedPlan, perturbed: dict[int, torch.Tensor],
                 steps: dict[int, torch.Tensor], Kc: int, channels_last: bool,
                 base: dict[fx.Node, Any], shared: dict[fx.Node, torch.Tensor],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(plan_, perturbed, Kc, channels_last, base=base)
        self.steps, self.dtype = steps, dtype  # id(param) -> (Kc, *shape): s e_k
        self.changes: dict[fx.Node, torch.Tensor] = {}  # input node -> D_k in dtype
        self.shared = shared  # input node -> its unperturbed value in dtype (per estimate)

    def conv(self, m: nn.Conv2d, h: torch.Tensor, st: bool,
             node: fx.Node | None = None) -> tuple[torch.Tensor, bool]:
        if (not st or m.groups != 1 or node is None or self.base is None
                or m.in_channels * m.weight[0, 0].numel() < DELTA_MIN_FAN_IN):
            return super().conv(m, h, st, node)  # float32, as grouped
        Kc, dt = self.Kc, self.dtype
        src = node.args[0]
        hb, a = self.base[src], self.base[node]
        change_in = self.changes.get(src)  # D_k, shared by the convs reading one input
        if change_in is None:
            change_in = (h.unflatten(1, (Kc, -1)) - hb.unsqueeze(1)).flatten(1, 2).to(dt)
            self.changes[src] = change_in
        sw = self.steps.get(id(m.weight))
        sb = self.steps.get(id(m.bias)) if m.bias is not None else None
        w = m.weight if sw is None else self.perturbed[id(m.weight)]
        w_dt = self._cl(self.spread(w, sw is not None).to(dt))  # W + s e_k, k < Kc
        if sw is None and sb is None:
            change = F.conv2d(change_in, w_dt, None, m.stride, m.padding, m.dilation, Kc)
        else:  # s e_k * h + s e'_k (h is shared by all k: one dense conv), + (W + s e_k) * D_k
            h_dt = self.shared.get(src)
            if h_dt is None:
                h_dt = self.shared[src] = hb.to(dt)
            step_w = (torch.zeros_like(m.weight).expand(Kc, *m.weight.shape) if sw is None
                      else sw).flatten(0, 1)
            bias = None if sb is None else sb.flatten().to(dt)
            change = F.conv2d(h_dt, self._cl(step_w.to(dt)), bias, m.stride, m.padding,
                              m.dilation)
            conv_add_(change, change_in, w_dt, m, Kc)
        out = change.to(a.dtype)
        out.unflatten(1, (Kc, -1)).add_(a.unsqueeze(1))
        return out, True

    def _cl(self, w: torch.Tensor) -> torch.Tensor:
        return w.contiguous(memory_format=torch.channels_last) if self.channels_last else w


_HEAP = {"set": False}
# glibc's mallopt parameters and the values ``steady_heap`` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_BYTES, HEAP_TRIM_BYTES = 32 << 20, 64 << 20


def steady_heap() -> bool:
    """Keep freed blocks of up to 32 MiB on glibc's heap instead of unmapping them.

    A delta (or grouped) chunk allocates and frees the same few multi-MiB activations each
    pass. glibc serves blocks above its mmap threshold with a fresh ``mmap`` and returns
    them on ``free``, so every chunk faults its pages in again; its threshold adapts
    upwards only after such a free. On a 2-core Xeon a warm LeNet delta estimate (K=20,
    chunk 4) faulted 28,000 pages in each time, and its K=100 step took 0.34-0.42 s
    instead of 0.21 s in some processes (tests/test_delta_engine.py counts the faults).
    This sets ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's upper limit for it) and
    ``M_TRIM_THRESHOLD`` to 64 MiB, once per process: up to 64 MiB of freed memory may
    stay mapped. Returns whether glibc took both (False on other C libraries).
    """
    if _HEAP["set"]:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_BYTES))
    _HEAP["set"] = ok
    log.debug("glibc mallopt: mmap threshold %d, trim threshold %d: %s", HEAP_MMAP_BYTES,
              HEAP_TRIM_BYTES, "set" if ok else "refused")
    return ok


def conv_add_(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, m: nn.Conv2d,
              groups: int) -> None:
    """out += conv2d(x, w) with ``m``'s geometry: on a CPU one oneDNN convolution with an
    add post-op (no second pass over ``out``), elsewhere a conv and an add."""
    if out.device.type == "cpu" and torch.backends.mkldnn.is_available():
        with suppress(RuntimeError, AttributeError):  # refused, or a build without it
            torch.ops.mkldnn._convolution_pointwise_.binary(
                out, x, w, None, list(_pair(m.padding)), list(_pair(m.stride)),
                list(_pair(m.dilation)), groups, "add", 1.0, None, [], None)
            return
    out.add_(F.conv2d(x, w, None, m.stride, m.padding, m.dilation, groups))


def _shifted(p: torch.Tensor, eps: torch.Tensor, step: float) -> torch.Tensor:
    """W + step * eps_k for each row k of ``eps``, written into ``eps`` (a draw of our own)
    where that keeps the dtype of ``p + step * eps``; the same bits either way."""
    if eps.dtype == p.dtype:
        return eps.mul_(step).add_(p)
    return p.unsqueeze(0) + step * eps


def per_k_losses(loss_fn: LossFn, per_k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``loss_fn(per_k[:, j], y)`` for each j, as a float32 CPU vector. From
    ``VMAP_LOSSES`` columns on, one ``vmap``-batched call (a few launches, not a few per
    column) where torch.func can batch ``loss_fn``; below that vmap's fixed cost is more
    than the loop's. Equal to the loop to float32 rounding."""
    if per_k.shape[1] >= VMAP_LOSSES and loss_fn not in _UNBATCHABLE:
        try:
            return vmap(loss_fn, in_dims=(1, None))(per_k, y).float().cpu()
        except Exception as e:  # noqa: BLE001 - a loss vmap cannot batch: take the loop
            log.debug("vmap cannot batch the loss (%s); evaluating it per perturbation", e)
            with suppress(TypeError):  # a callable without weak references: retried
                _UNBATCHABLE.add(loss_fn)  # not tried again on the next chunk or step
    return torch.stack([loss_fn(per_k[:, j], y) for j in range(per_k.shape[1])]).float().cpu()


def activation_bytes(plan_: GroupedPlan, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the activations of one unperturbed forward pass through the plan: the
    peak of those alive at once, and the total of all of them (what ``reuse`` keeps)."""
    peak = live = total = 0
    sizes: dict[fx.Node, int] = {}
    run = _Stacked(plan_, {}, 1)
    env: dict[fx.Node, tuple[Any, bool]] = {}
    for node in plan_.graph.nodes:  # same walk as _Stacked.run, counting bytes
        if node.op == "placeholder":
            env[node] = (x, False)
            continue
        if node.op == "output":
            break
        if node.op == "call_module":
            m = plan_.modules[node.target]
            env[node] = (m(env[node.args[0]][0]), False)
        elif node.target in _ADDS:
            env[node] = run.add(node, env[node.args[0]], env[node.args[1]])
        else:
            env[node] = (env[node.args[0]][0].flatten(1), False)
        t = env[node][0]
        sizes[node] = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        live += sizes[node]
        total += sizes[node]
        peak = max(peak, live)
        for dead in plan_.last_use[node]:
            live -= sizes.pop(dead, 0)
            env.pop(dead, None)
    return peak, total


def prefer_channels_last(x: torch.Tensor) -> bool:
    """Images on a CPU: oneDNN convolutions run about twice as fast in channels-last."""
    return x.dim() == 4 and x.device.type == "cpu"


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory if that is faster (same values, other strides)."""
    return x.to(memory_format=torch.channels_last) if prefer_channels_last(x) else x


# --------------------------------------------------------------------------- vmap
def vmap_losses(
    loss_at: LossAt,
    params: dict[str, torch.Tensor],
    draw: Draw,
    K: int,
    step: float,
    chunk: int,
) -> torch.Tensor:
    """L(W + step * eps_k) for k < K, ``chunk`` perturbed models per vmapped pass."""
    batched_loss = vmap(loss_at)
    out = []
    for start in range(0, K, max(1, chunk)):
        ks = range(start, min(K, start + max(1, chunk)))
        points = {
            n: p.unsqueeze(0) + step * draw(ks, i, p.shape, p.device)
            for i, (n, p) in enumerate(params.items())
        }
        out.append(batched_loss(points).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- sequential
def sequential_losses(
    loss_at: LossAt,
    params: dict[str, torch.Tensor],
    draw: Draw,
    K: int,
    step: float,
) -> torch.Tensor:
    """L(W + step * eps_k) for k < K, one functional perturbed copy at a time."""
    out = torch.empty(K)
    for k in range(K):
        point = {
            n: p + step * draw(range(k, k + 1), i, p.shape, p.device)[0]
            for i, (n, p) in enumerate(params.items())
        }
        out[k] = loss_at(point)
    return out


# --------------------------------------------------------------------------- in-place
@contextmanager
def _perturb_in_place(model: nn.Module, index: dict[int, int], draw: Draw, step: float,
                      k: list[int]) -> Iterator[None]:
    """Hooks that perturb each module's own parameters just for its forward, then restore.

    ``k[0]`` is the direction currently evaluated (a cell, so one set of hooks serves all k).
    """
    owners = [(m, [p for p in m.parameters(recurse=False) if id(p) in index])
              for m in model.modules()]
    owners = [(m, ps) for m, ps in owners if ps]
    scratch_numel = max((sum(p.numel() for p in ps) for _, ps in owners), default=0)
    ref = next(p for _, ps in owners for p in ps) if owners else None
    scratch = (torch.empty(scratch_numel, dtype=ref.dtype, device=ref.device)
               if ref is not None else None)
    active: list[list[torch.Tensor]] = []

    def pre(m: nn.Module, _: Any, ps: list[torch.Tensor]) -> None:
        assert scratch is not None
        if active:  # a module called inside another owner's forward: restore that one first
            raise RuntimeError("nested parameter owners are not supported by the inplace engine")
        offset = 0
        for p in ps:
            scratch[offset:offset + p.numel()].copy_(p.reshape(-1))
            offset += p.numel()
            eps = draw(range(k[0], k[0] + 1), index[id(p)], p.shape, p.device)[0].to(p.dtype)
            p.add_(eps.mul_(step))  # p + step*eps: the same float ops as the other engines
        active.append(ps)

    def post(m: nn.Module, _: Any, __: Any) -> None:
        restore()

    def restore() -> None:
        if not active or scratch is None:
            return
        offset = 0
        for p in active.pop():
            p.copy_(scratch[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    handles = []
    for m, ps in owners:
        handles.append(m.register_forward_pre_hook(lambda mod, a, ps=ps: pre(mod, a, ps)))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        restore()  # a forward that raised mid-module leaves one module perturbed
        for h in handles:
            h.remove()


def inplace_losses(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: dict[str, torch.Tensor],
    draw: Draw,
    K: int,
    step: float,
) -> torch.Tensor:
    """L(W + step * eps_k) for k < K, each evaluated in the model's own (restored) weights."""
    index = {id(p): i for i, p in enumerate(params.values())}
    out = torch.empty(K)
    cell = [0]
    with _perturb_in_place(model, index, draw, step, cell):
        for k in range(K):
            cell[0] = k
            out[k] = loss_fn(model(x), y)
    return out


# --------------------------------------------------------------------------- sizing, auto
def param_bytes(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


def chunk_for(per_perturbation: int, budget: int, K: int, cap: int) -> int:
    """The largest Kc <= min(K, cap) whose Kc * ``per_perturbation`` bytes fit ``budget``."""
    return max(1, min(K, cap, budget // max(1, per_perturbation)))


def per_perturbation_bytes(act_bytes: int, n_param_bytes: int) -> int:
    """Scratch one more perturbation adds to a grouped pass: its activations (x2 for the
    temporaries of a layer: input and output live together) and its weights (x2: the
    direction and the perturbed copy)."""
    return 2 * act_bytes + 2 * n_param_bytes


_logged: set[tuple[str, str, int]] = set()


def log_choice(model: nn.Module, engine: str, why: str) -> None:
    """Log the engine ``auto`` picked, once per model class, engine and reason."""
    key = (type(model).__name__, engine, hash(why))
    level = logging.INFO if key not in _logged else logging.DEBUG
    _logged.add(key)
    log.log(level, "engine auto -> %s for %s: %s", engine, type(model).__name__, why)
