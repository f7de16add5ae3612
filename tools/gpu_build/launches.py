"""Every Triton kernel launch the public ops make, recorded in Triton's CPU interpreter.

:func:`recording` wraps the interpreter's launch (``InterpretedFunction.run``) and its ``tl.dot``
builder: each launch is recorded as the kernel (module and name), the type of every argument as the
CUDA launcher would specialize it (``*fp16``, ``i32``, divisibility by 16, integers equal to 1 as
constants), its constexpr values, and the bit width of its ``tl.dot`` operands. The list of
variants therefore comes from the launch code itself: :func:`sweep` runs the public ops over dtypes,
head dims, statistics, queries, attention backends and selection modes, and whatever they launch is
what gets compiled. The interpreter has no bfloat16: :func:`with_bfloat16` adds, for each launch
with float16 tensors, the same launch with bfloat16 ones (what a bfloat16 model launches).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from pruneattn._progress import progress_bar
from pruneattn.validate import MODES, QUERIES, STATS

__all__ = ["Launch", "recording", "sweep", "tl_value", "with_bfloat16"]

# Options a launch may pass besides the kernel's parameters (the CUDA backend's defaults otherwise).
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                    torch.uint8: "u8", torch.bool: "i1"}


@dataclass(frozen=True)
class Launch:
    """One kernel variant: what the compiler needs besides the autotune config.

    ``signature`` holds the type of each runtime argument (``"constexpr"`` for integers equal to 1,
    which the launcher turns into constants), ``attrs`` ``"D"`` for arguments divisible by 16,
    ``constexprs`` the constant values (autotuned meta-parameters left out: ``tuned`` names them),
    ``options`` what a plain launch passed (``num_warps``, ``num_stages``).
    """

    kernel: str  # "module:attribute" of the launched object (an Autotuner or a JITFunction)
    signature: tuple[tuple[str, str], ...]
    attrs: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    tuned: tuple[str, ...] = ()
    options: tuple[tuple[str, int], ...] = ()
    dot_bits: tuple[int, ...] = ()  # bit width of each distinct tl.dot operand type; empty: no tl.dot
    dtype: str = ""  # the kernel's floating-point tensors: float16, bfloat16 or float32
    head_dim: int | None = None  # the HEAD_DIM constant, for kernels that have one
    used_by: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1].strip("_").removesuffix("_kernel")

    def key(self) -> tuple:
        return (self.kernel, self.signature, self.attrs, self.constexprs, self.tuned, self.options)

    @property
    def label(self) -> str:
        """The kernel and its constants that are not strides, e.g. ``attention_fwd[float16, HEAD_DIM=64, ...]``."""
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs if not k.startswith(("stride_", "DTYPE_KEY")))
        return f"{self.name}[{self.dtype}{', ' if consts else ''}{consts}]"

    def key_str(self) -> str:
        """:attr:`label` plus a short hash of the whole launch (types and divisibility included)."""
        return f"{self.label} #{hashlib.sha1(repr(self.key()).encode()).hexdigest()[:6]}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d

    @staticmethod
    def from_dict(d: dict) -> Launch:
        def pairs(x):
            return tuple(tuple(p) for p in x)

        return Launch(d["kernel"], pairs(d["signature"]), pairs(d["attrs"]), pairs(d["constexprs"]),
                      tuple(d["tuned"]), pairs(d["options"]), tuple(d["dot_bits"]), d["dtype"], d["head_dim"],
                      tuple(d["used_by"]))


def _specialize(value) -> tuple[str, str | None]:
    """(type, attribute) as the CUDA launcher specializes one runtime argument."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        return ty, spec if isinstance(spec, str) else None
    except (ImportError, TypeError):  # older or newer triton: the same rules, written out
        if isinstance(value, torch.Tensor):
            return "*" + _TORCH_TO_TRITON[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", None
            return ("i32" if -2**31 <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""
        if isinstance(value, float):
            return "fp32", None
        if value is None:
            return "constexpr", None
        raise


def _plain(value):
    """A constexpr value as JSON can hold it: Triton dtypes become ``"tl:fp32"`` (see :func:`tl_value`)."""
    import triton.language as tl

    return f"tl:{value.name}" if isinstance(value, tl.dtype) else value


def tl_value(value):
    """The constexpr value the compiler needs: ``"tl:fp32"`` back to ``tl.float32``."""
    import triton.language as tl

    return tl.dtype(value[3:]) if isinstance(value, str) and value.startswith("tl:") else value


def _owner(fn) -> str:
    """``module:attribute`` of the object that launches ``fn`` (its Autotuner if it has one)."""
    module = sys.modules[fn.fn.__module__]
    for attr, obj in vars(module).items():
        if obj is fn or getattr(obj, "fn", None) is fn:
            return f"{module.__name__}:{attr}"
    raise LookupError(f"no module attribute launches {fn.fn.__name__}")


def _dtype_of(signature: list[tuple[str, str]]) -> str:
    """The floating-point type of the launch's tensors: the 16-bit one if any, else float32 if any."""
    types = {ty for _, ty in signature}
    for ty, name in (("*fp16", "float16"), ("*bf16", "bfloat16"), ("*fp32", "float32")):
        if ty in types:
            return name
    return ""


class _Recorder:
    def __init__(self, context: dict) -> None:
        self.context = context
        self.launches: dict[tuple, Launch] = {}
        self.dot_bits: set[int] | None = None

    def record(self, fn, args: tuple, kwargs: dict) -> None:
        owner_name = _owner(fn)
        module, attr = owner_name.split(":")
        owner = getattr(sys.modules[module], attr)
        tuned = tuple(sorted({k for c in getattr(owner, "configs", ()) for k in c.kwargs}))
        params = inspect.signature(fn.fn).parameters
        values = dict(zip(fn.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in params})
        sig, attrs, consts = [], [], []
        for name in fn.arg_names:
            if name in tuned:
                continue
            value = values[name]
            if "constexpr" in str(params[name].annotation):
                consts.append((name, _plain(value)))
                continue
            ty, spec = _specialize(value)
            sig.append((name, ty))
            if ty == "constexpr":
                consts.append((name, value))
            elif spec:
                attrs.append((name, spec))
        options = () if tuned else tuple(sorted({**DEFAULT_OPTIONS, **{
            k: v for k, v in kwargs.items() if k in DEFAULT_OPTIONS}}.items()))
        self._pending = Launch(owner_name, tuple(sig), tuple(attrs), tuple(consts), tuned, options,
                               dtype=_dtype_of(sig), head_dim=dict(consts).get("HEAD_DIM"))
        self.dot_bits = set()

    def done(self) -> None:
        launch = replace(self._pending, dot_bits=tuple(sorted(self.dot_bits)))
        self.dot_bits = None
        use = self.context.get("op", "")
        old = self.launches.get(launch.key())
        if old is None:
            self.launches[launch.key()] = replace(launch, used_by=(use,))
        elif use not in old.used_by:
            self.launches[launch.key()] = replace(old, used_by=(*old.used_by, use))


@contextlib.contextmanager
def recording() -> Iterator[_Recorder]:
    """Record every interpreted kernel launch inside the ``with`` block (set ``rec.context`` to label them)."""
    from pruneattn.backend import interpreting

    if not interpreting():
        raise RuntimeError("recording launches needs TRITON_INTERPRET=1 set before pruneattn's kernels are imported")
    from triton.runtime import interpreter

    fn_cls, builder = interpreter.InterpretedFunction, interpreter.InterpreterBuilder
    if not callable(getattr(fn_cls, "run", None)) or not callable(getattr(builder, "create_dot", None)):
        raise RuntimeError("this triton's interpreter has no InterpretedFunction.run / InterpreterBuilder.create_dot")
    rec = _Recorder({})
    run, dot = fn_cls.run, builder.create_dot

    def run_hook(self, *args, **kwargs):
        if kwargs.get("warmup"):
            return run(self, *args, **kwargs)
        rec.record(self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        out = run(self, *args, **kwargs)
        rec.done()
        return out

    def dot_hook(self, a, b, *args, **kwargs):
        if rec.dot_bits is not None:
            rec.dot_bits.update((a.dtype.primitive_bitwidth, b.dtype.primitive_bitwidth))
        return dot(self, a, b, *args, **kwargs)

    fn_cls.run, builder.create_dot = run_hook, dot_hook
    try:
        yield rec
    finally:
        fn_cls.run, builder.create_dot = run, dot


def _qkv(B: int, H: int, N: int, d: int, dtype: torch.dtype, g: torch.Generator):
    """q, k, v as a timm model makes them: views of one (B, N, 3, H, d) buffer."""
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def sweep(
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.float32),
    head_dims: Sequence[int] = (64, 128),
    shapes: Sequence[tuple[int, int]] = ((3, 197),),
    op_shape: tuple[int, int] = (3, 50),
    stats: Sequence[str] = STATS,
    progress: bool = False,
) -> list[Launch]:
    """Run the public ops in the interpreter and return the distinct launches they make.

    For each dtype and head dim, at ``op_shape`` (H, N): ``attention_scores`` for every statistic
    and query on the fused kernel, and on the SDPA + class-row backend for ``query="cls"``; then
    ``select_tokens`` in both modes. For each standard shape (H, N) in ``shapes`` (whose launches
    differ only in the statistic, selection and gather kernels: the attention kernels' constants do
    not depend on H or N): ``head_statistic`` for every statistic and query on float32 rows, and
    ``select_tokens`` in both modes on tokens of width H * 64 in each dtype. Padding masks: at d = 64,
    ``attention_scores`` with a mask for both queries on the fused kernel, and ``select_tokens`` with a
    mask in both modes at every shape.
    """
    import pruneattn
    from pruneattn.backend import use_attention_kernel, use_backend
    from pruneattn.kernels.head_statistic import head_statistic

    g = torch.Generator().manual_seed(0)
    jobs = [("op", dt, d, op_shape) for dt in dtypes for d in head_dims]
    jobs += [("shape", dt, 64, s) for s in shapes for dt in dtypes]
    jobs = progress_bar(jobs, enabled=progress, desc="recording launches", unit="case")
    with recording() as rec, use_backend("triton"):
        for kind, dtype, d, (H, N) in jobs:
            rec.context = {}
            x = torch.randn(1, N, H * d, generator=g).to(dtype)
            if kind == "op":
                q, k, v = _qkv(1, H, N, d, dtype, g)
                res = None
                for query in QUERIES:
                    for backend in ("fused", "sdpa") if query == "cls" else ("fused",):
                        for stat in stats:
                            rec.context["op"] = f"attention_scores(stat={stat}, query={query}) [{backend}]"
                            with use_attention_kernel(backend):
                                res = pruneattn.attention_stats(q, k, v, stat=stat, query=query)
                    if d == 64:
                        rec.context["op"] = f"attention_scores(stat=var, query={query}, valid=mask) [fused]"
                        pruneattn.attention_stats(q, k, v, stat="var", query=query, valid=_half_real(N))
                scores, weights = res.scores, res.head_mean
            else:
                for query in QUERIES:
                    rows = torch.randn(1, H, N, generator=g)
                    lse = rows.exp2().sum(-1, keepdim=True).log2().expand(1, H, N).contiguous()
                    for stat in stats:
                        rec.context["op"] = f"head statistic (stat={stat}, query={query})"
                        head_statistic(rows, stat=stat, num_prefix=1, class_lse=lse[:, :, 0] if query == "cls" else None)
                scores, weights = torch.rand(1, N - 1, generator=g), torch.rand(1, N - 1, generator=g)
            for mode in MODES:
                for valid in (None, _half_real(N)):
                    rec.context["op"] = f"select_tokens(mode={mode}{', valid=mask' if valid is not None else ''})"
                    pruneattn.select_tokens(x, scores, keep_rate=0.7, mode=mode,
                                            fuse_weights=weights if mode == "fuse" else None, valid=valid)
    return list(rec.launches.values())


def _half_real(N: int) -> torch.Tensor:
    """A (1, N) padding mask whose first half (at least the class token and one patch) is real."""
    valid = torch.zeros(1, N, dtype=torch.bool)
    valid[0, : max(2, N // 2)] = True
    return valid


def with_bfloat16(launches: list[Launch]) -> list[Launch]:
    """The launches, plus a bfloat16 copy of each that passes float16 tensors."""
    out = list(launches)
    for launch in launches:
        if not any(ty == "*fp16" for _, ty in launch.signature):
            continue
        sig = tuple((n, "*bf16" if ty == "*fp16" else ty) for n, ty in launch.signature)
        consts = tuple((n, "torch.bfloat16" if v == "torch.float16" else v) for n, v in launch.constexprs)
        out.append(replace(launch, signature=sig, constexprs=consts, dtype="bfloat16"))
    return out
