"""Builds, caches and calls the CPU C kernels (float32): paged decode attention, the
decoder's fused element-wise ops and the small-batch matmul of the linear layers.

The sources are compiled on first use with the system C compiler into one library in the
novainfer cache, keyed by the sources, the flags, the compiler's version and the CPU, so
later starts only load it. They include no torch headers (the kernels take raw pointers), so
a build takes about a second. Without a compiler everything runs the plain PyTorch code
instead.

The C code trusts its pointers, so the wrappers check what it cannot: dtypes, contiguity and
shapes (attribute reads, per call). Index ranges (KV slots, block ids, sequence lengths,
rotary positions) are checked by the kernels themselves before they touch memory, a compare
per index, and reported here as ValueError. Every such error is an internal bug guard: the
engine builds these tensors itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(n)
    for n in ("cpu_decode_attention.c", "cpu_elementwise.c", "cpu_linear.c")
]
HEADERS = [Path(__file__).with_name("cpu_vec.h")]  # part of the cache key, not compiled
# No -ffast-math (nor -Ofast, -funsafe-math-optimizations): with it GCC links crtfastmath.o,
# whose constructor turns on flush-to-zero for the whole process when the library loads
# (torch, numpy and transformers then lose denormals), and it lets the compiler assume there
# is no inf or NaN. What the kernels used from it is explicit instead: FMA contraction here,
# `omp simd reduction` on the loops that sum, and an exp of their own (cpu_vec.h) where
# glibc's vector expf needs -ffast-math.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
         "-fopenmp", "-fPIC"]
BUILD_TIMEOUT_S = 120.0  # a build takes ~1 s; a hung compiler must not hang the engine
PANEL = 16  # output columns per panel of a packed weight (cpu_linear.c)
_library: ctypes.CDLL | None = None
_failure: str | None = None


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """The CPU's model and flags: the library is built with -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(wanted[:2]) or os.uname().machine


def _run_tool(cmd: list[str], timeout: float, what: str) -> str:
    """stdout of `cmd`; RuntimeError when it fails or outlives `timeout` (then it is killed with
    its children: a compiler driver's cc1/as/ld would otherwise keep the pipes open)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as e:
        raise RuntimeError(f"{what} failed: cannot run {cmd[0]} ({e})") from None
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(
                f"{what} took more than {timeout:g} s and was stopped: {' '.join(cmd)}"
            ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {' '.join(cmd)}\n{err}")
    return out


def cache_key(compiler: str) -> str:
    """Names the library: its sources, flags, compiler (path and version) and CPU."""
    version = _run_tool([compiler, "--version"], 30.0, "asking the C compiler its version")
    parts = [*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(FLAGS).encode(),
             compiler.encode(), version.encode(), _cpu_signature().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _check_private(path: Path) -> None:
    """RuntimeError unless `path` is ours and only we can write it: anyone who can replace the
    library gets their code run in this process."""
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise RuntimeError(f"{path} belongs to user id {info.st_uid}, not to this user; "
                           "refusing to load the CPU kernels from it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.filemode(info.st_mode)
        raise RuntimeError(f"{path} is writable by other users (mode {mode}); refusing to load "
                           "the CPU kernels from it")


def kernels_dir() -> Path:
    """The library's folder in the novainfer cache, created private (0700) and checked to be
    ours alone. Only this folder: the cache root is shared with the converted models."""
    from novainfer.loader.model_path import cache_root

    directory = cache_root() / "kernels"
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_private(directory)
    return directory


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on the folder's lock file, so that processes starting together
    build the library once; gives up after the time a build may take."""
    import fcntl  # POSIX only, like the kernels' build; not needed to import novainfer

    fd = os.open(directory / "build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_S + 30
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process has held {directory / 'build.lock'} "
                                       "longer than a build may take") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(compiler: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, "-shared", *map(str, SOURCES), "-o", str(out), "-lm"]
        _run_tool(cmd, BUILD_TIMEOUT_S, "building the CPU kernels")
        os.replace(out, target)  # atomic: a reader never sees a half-written file


def load_library() -> ctypes.CDLL:
    """The compiled kernel library; RuntimeError (with the reason) when it cannot be built."""
    global _library
    if _library is not None:
        return _library
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc) for the CPU kernels")
    directory = kernels_dir()
    target = directory / f"cpu_kernels-{cache_key(compiler)}.so"
    if not target.exists():
        with _build_lock(directory):
            if not target.exists():  # built by another process while this one waited
                _build(compiler, target)
    _check_private(target)
    # torch is imported first, so the kernel's libgomp.so.1 resolves to torch's own copy:
    # one OpenMP thread pool in the process, not two fighting for the cores.
    lib = ctypes.CDLL(str(target))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "paged_decode_attention_f32": (
            [p] * 4 + [i64] * 2 + [p] * 2 + [i64] * 6 + [f32, ctypes.c_int], ctypes.c_int
        ),
        "rms_norm_f32": ([p] * 3 + [i64] * 2 + [f32], None),
        "add_rms_norm_f32": ([p] * 5 + [i64] * 2 + [f32], None),
        "rope_f32": ([p, i64, i64, p, i64, i64] + [p] * 3 + [i64] * 3, ctypes.c_int),
        "silu_and_mul_f32": ([p, p, i64, i64], None),
        "store_kv_f32": ([p] * 5 + [i64] * 3, ctypes.c_int),
        "pack_linear_weight_f32": ([p, p, i64, i64], None),
        "packed_linear_f32": ([p] * 4 + [i64] * 3 + [ctypes.c_int], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _library = lib
    return lib


def _run(name: str, *args):
    """Call a kernel; under torch.profiler inside a named range, so `novainfer profile` sees
    the time (a ctypes call is otherwise invisible to it). The check costs ~0.1 us."""
    fn = getattr(load_library(), name)
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function("cpu_kernel::" + name):
            return fn(*args)
    return fn(*args)


def native_available() -> bool:
    """Whether the C kernels can be used (built once per process; a failure is warned once)."""
    global _failure
    if _library is not None:
        return True
    if _failure is not None:
        return False
    try:
        load_library()
        return True
    except (RuntimeError, OSError) as e:
        _failure = str(e)
        warnings.warn(f"CPU kernels unavailable, running plain PyTorch ops: {e}", stacklevel=2)
        return False


# The checks below run ~300 times per step: each is a few attribute reads, ordered so that
# every tensor's shape is read once (a torch.Size costs more than a dtype or a flag).
F32, I32, I64 = torch.float32, torch.int32, torch.int64


def _bad(fn: str, name: str, expected: str, got: object) -> ValueError:
    """The error for an argument the C kernel cannot take: it names the argument, what was
    expected and what came."""
    if isinstance(got, torch.Tensor):
        got = f"{got.dtype} {tuple(got.shape)}, strides {got.stride()}"
    return ValueError(f"cpu_native.{fn}: {name} must be {expected}, got {got} (internal bug "
                      "guard: the C kernel would have read or written the wrong memory)")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [seqs, heads, head_dim] fp32 attends its paged context; returns [seqs, heads, head_dim].

    k_cache/v_cache: [num_blocks, block_size, kv_heads, head_dim] contiguous; block_tables
    int32 [seqs, >= blocks per sequence]; seq_lens int32 [seqs] (the context including this
    token). `out`, when given, must be a contiguous float32 tensor shaped like q.
    """
    fn = "paged_decode_attention"
    q = q.contiguous()
    tables = (block_tables if block_tables.dtype is I32 else block_tables.to(I32)).contiguous()
    lens = (seq_lens if seq_lens.dtype is I32 else seq_lens.to(I32)).contiguous()
    out = torch.empty_like(q) if out is None else out
    q_shape, cache_shape = q.shape, k_cache.shape
    if q.dtype is not F32 or len(q_shape) != 3 or q_shape[2] % 8:
        raise _bad(fn, "q", "float32 [seqs, heads, head_dim], head_dim a multiple of 8", q)
    num_seqs, num_heads, head_dim = q_shape
    if (k_cache.dtype is not F32 or len(cache_shape) != 4 or cache_shape[3] != head_dim
            or not cache_shape[2] or num_heads % cache_shape[2] or not k_cache.is_contiguous()):
        raise _bad(fn, "k_cache", f"contiguous float32 [blocks, block_size, kv_heads dividing "
                   f"{num_heads}, {head_dim}]", k_cache)
    if v_cache.dtype is not F32 or v_cache.shape != cache_shape or not v_cache.is_contiguous():
        raise _bad(fn, "v_cache", f"contiguous float32 {tuple(cache_shape)} like k_cache",
                   v_cache)
    table_shape = tables.shape
    if len(table_shape) != 2 or table_shape[0] != num_seqs:
        raise _bad(fn, "block_tables", f"[{num_seqs}, blocks]", tables)
    if lens.shape != q_shape[:1]:
        raise _bad(fn, "seq_lens", f"[{num_seqs}]", lens)
    if out.dtype is not F32 or out.shape != q_shape or not out.is_contiguous():
        raise _bad(fn, "out", f"contiguous float32 {tuple(q_shape)} like q", out)
    num_blocks, block_size, num_kv_heads, _ = cache_shape
    status = _run(
        "paged_decode_attention_f32",
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        table_shape[1], table_shape[1], lens.data_ptr(), out.data_ptr(),  # rows contiguous
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale,
        torch.get_num_threads(),
    )
    if status == 1:
        limit = table_shape[1] * block_size
        raise _bad(fn, "seq_lens", f"in [1, {limit}] (block table width x block size)",
                   lens[(lens < 1) | (lens > limit)][:8].tolist())
    if status == 2:
        used = torch.arange(table_shape[1]) < (lens[:, None] + block_size - 1) // block_size
        bad = tables[used & ((tables < 0) | (tables >= num_blocks))]
        raise _bad(fn, "block_tables", f"block ids in [0, {num_blocks}) where a sequence reads",
                   bad[:8].tolist())
    if status != 0:
        raise MemoryError("paged_decode_attention_f32 could not allocate its score buffer")
    return out


def _check_norm(fn: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Size:
    """x's shape, once x and weight are fit for the C norm."""
    shape = x.shape
    if x.dtype is not F32 or not shape or not shape[-1]:
        raise _bad(fn, "x", "float32 [..., n]", x)
    if weight.dtype is not F32 or weight.shape != shape[-1:] or not weight.is_contiguous():
        raise _bad(fn, "weight", f"contiguous float32 [{shape[-1]}]", weight)
    return shape


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    n = _check_norm("rms_norm", x, weight)[-1]
    out = torch.empty_like(x)
    _run("rms_norm_f32", x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x, residual = x.contiguous(), residual.contiguous()
    shape = _check_norm("add_rms_norm", x, weight)
    if residual.dtype is not F32 or residual.shape != shape:
        raise _bad("add_rms_norm", "residual", f"float32 {tuple(shape)} like x", residual)
    n = shape[-1]
    out, total = torch.empty_like(x), torch.empty_like(x)
    _run("add_rms_norm_f32",
        x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), total.data_ptr(),
        x.numel() // n, n, eps,
    )
    return out, total


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [tokens, heads, d] and k [tokens, kv_heads, d] in place; returns them.

    Each may be a row-strided view (the fused qkv output) but its heads must be contiguous.
    cos/sin: contiguous float32 tables [positions, d]; every position must be in them.
    """
    fn = "apply_rope"
    positions = (positions if positions.dtype is I64 else positions.to(I64)).contiguous()
    q_shape, k_shape, table_shape = q.shape, k.shape, cos.shape
    q_stride, k_stride = q.stride(), k.stride()
    if q.dtype is not F32 or len(q_shape) != 3 or q_stride[1:] != (q_shape[2], 1):
        raise _bad(fn, "q", "float32 [tokens, heads, head_dim] with contiguous heads", q)
    tokens, _, head_dim = q_shape
    if (k.dtype is not F32 or len(k_shape) != 3 or k_shape[0] != tokens
            or k_shape[2] != head_dim or k_stride[1:] != (head_dim, 1)):
        raise _bad(fn, "k", f"float32 [{tokens}, kv_heads, {head_dim}] with contiguous heads", k)
    if positions.shape != q_shape[:1]:
        raise _bad(fn, "positions", f"[{tokens}]", positions)
    if (cos.dtype is not F32 or len(table_shape) != 2 or table_shape[1] != head_dim
            or not cos.is_contiguous()):
        raise _bad(fn, "cos", f"a contiguous float32 table [positions, {head_dim}]", cos)
    if sin.dtype is not F32 or sin.shape != table_shape or not sin.is_contiguous():
        raise _bad(fn, "sin", f"a contiguous float32 table {tuple(table_shape)} like cos", sin)
    status = _run("rope_f32",
        q.data_ptr(), q_stride[0], q_shape[1], k.data_ptr(), k_stride[0], k_shape[1],
        positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), table_shape[0], tokens, head_dim,
    )
    if status != 0:
        limit = table_shape[0]
        raise _bad(fn, "positions", f"in [0, {limit}) (the rotary table's length)",
                   positions[(positions < 0) | (positions >= limit)][:8].tolist())
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    shape = gate_up.shape
    if gate_up.dtype is not F32 or not shape or not shape[-1] or shape[-1] % 2:
        raise _bad("silu_and_mul", "gate_up", "float32 [..., 2 * n]", gate_up)
    n = shape[-1] // 2
    out = gate_up.new_empty((*shape[:-1], n))
    _run("silu_and_mul_f32", gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Writes rows of k, v [tokens, kv_heads, d] into kv_cache [2, blocks, block_size, kv_heads,
    d] (contiguous) at the flat slots; slots < 0 are skipped, the others must be in the cache."""
    fn = "store_kv"
    k, v = k.contiguous(), v.contiguous()
    slots = (slots if slots.dtype is I64 else slots.to(I64)).contiguous()
    k_shape, cache_shape = k.shape, kv_cache.shape
    if k.dtype is not F32 or len(k_shape) != 3:
        raise _bad(fn, "k", "float32 [tokens, kv_heads, head_dim]", k)
    if v.dtype is not F32 or v.shape != k_shape:
        raise _bad(fn, "v", f"float32 {tuple(k_shape)} like k", v)
    if (kv_cache.dtype is not F32 or len(cache_shape) != 5 or cache_shape[0] != 2
            or cache_shape[3:] != k_shape[1:] or not kv_cache.is_contiguous()):
        raise _bad(fn, "kv_cache", f"contiguous float32 [2, blocks, block_size, {k_shape[1]}, "
                   f"{k_shape[2]}]", kv_cache)
    if slots.shape != k_shape[:1]:
        raise _bad(fn, "slots", f"[{k_shape[0]}], one per row of k", slots)
    num_slots = cache_shape[1] * cache_shape[2]
    row = k_shape[1] * k_shape[2]
    k_cache = kv_cache.data_ptr()
    v_cache = k_cache + num_slots * row * 4  # kv_cache[1], without building the view
    status = _run("store_kv_f32",
        k.data_ptr(), v.data_ptr(), k_cache, v_cache, slots.data_ptr(), k_shape[0], row,
        num_slots,
    )
    if status != 0:
        raise _bad(fn, "slots", f"below {num_slots} (the cache's slots), or negative for padding",
                   slots[slots >= num_slots][:8].tolist())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [out, in] repacked into the panel layout that `packed_linear` reads:
    [ceil(out / 16), in, 16], the padding columns zero."""
    if weight.dtype is not F32 or weight.dim() != 2:
        raise _bad("pack_linear_weight", "weight", "float32 [out, in]", weight)
    n, k = weight.shape
    weight = weight.contiguous()
    packed = weight.new_empty(((n + PANEL - 1) // PANEL, k, PANEL))
    _run("pack_linear_weight_f32", weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def unpack_linear_weight(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight [out, in] back from its panels, in a new tensor (PyTorch, the packing's
    inverse)."""
    panels, in_features, _ = packed.shape
    weight = packed.new_empty((panels * PANEL, in_features))
    weight.view(panels, PANEL, in_features).copy_(packed.transpose(1, 2))
    return weight[:out_features]


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight given by `pack_linear_weight`; x [..., in]
    float32."""
    fn = "packed_linear"
    panel_shape = packed.shape
    if (packed.dtype is not F32 or len(panel_shape) != 3 or panel_shape[2] != PANEL
            or panel_shape[0] != (out_features + PANEL - 1) // PANEL
            or not packed.is_contiguous()):
        raise _bad(fn, "packed", f"the contiguous float32 panels of a [{out_features}, in] "
                   "weight", packed)
    k = panel_shape[1]
    x_shape = x.shape
    if x.dtype is not F32 or not x_shape or x_shape[-1] != k:
        raise _bad(fn, "x", f"float32 [..., {k}]", x)
    if bias is not None:
        bias = bias.contiguous()  # kept alive through the call
        if bias.dtype is not F32 or bias.shape != (out_features,):
            raise _bad(fn, "bias", f"float32 [{out_features}]", bias)
    flat = len(x_shape) == 2  # the layers' case: no reshape or view (~2 us each)
    rows = (x if flat else x.reshape(-1, k)).contiguous()
    m = x_shape[0] if flat else rows.shape[0]
    out = rows.new_empty((m, out_features))
    _run("packed_linear_f32",
        rows.data_ptr(), packed.data_ptr(), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), m, out_features, k, torch.get_num_threads(),
    )
    return out if flat else out.view(*x_shape[:-1], out_features)
