"""Builds, caches and calls the CPU C kernels (float32): paged decode attention, the
decoder's fused element-wise ops and the small-batch matmul of the linear layers.

The sources are compiled on first use with the system C compiler into one library in the
novainfer cache, keyed by the sources, the compiler and the CPU, so later starts only load
it. They include no torch headers (the kernels take raw pointers), so a build takes about a
second. Without a compiler everything runs the plain PyTorch code instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(n)
    for n in ("cpu_decode_attention.c", "cpu_elementwise.c", "cpu_linear.c")
]
HEADERS = [Path(__file__).with_name("cpu_vec.h")]  # part of the cache key, not compiled
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


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared",
               *map(str, SOURCES), "-o", str(out), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed: {' '.join(cmd)}\n{done.stderr}")
        os.replace(out, target)  # atomic: concurrent builders never load a half-written file


def load_library() -> ctypes.CDLL:
    """The compiled kernel library; RuntimeError (with the reason) when it cannot be built."""
    global _library
    if _library is not None:
        return _library
    from novainfer.loader.model_path import cache_root

    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc) for the CPU kernels")
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS)
        + compiler.encode()
        + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.exists():
        _build(compiler, target)
    # torch is imported first, so the kernel's libgomp.so.1 resolves to torch's own copy:
    # one OpenMP thread pool in the process, not two fighting for the cores.
    lib = ctypes.CDLL(str(target))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "paged_decode_attention_f32": ([p] * 4 + [i64] + [p] * 2 + [i64] * 5 + [f32, ctypes.c_int],
                                       ctypes.c_int),
        "rms_norm_f32": ([p] * 3 + [i64] * 2 + [f32], None),
        "add_rms_norm_f32": ([p] * 5 + [i64] * 2 + [f32], None),
        "rope_f32": ([p, i64, i64, p, i64, i64] + [p] * 3 + [i64] * 2, None),
        "silu_and_mul_f32": ([p, p, i64, i64], None),
        "store_kv_f32": ([p] * 5 + [i64] * 2, None),
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

    k_cache/v_cache: [num_blocks, block_size, kv_heads, head_dim]; block_tables int32
    [seqs, >= blocks per sequence]; seq_lens int32 [seqs] (the context including this token).
    `out`, when given, must be a contiguous float32 tensor shaped like q.
    """
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q) if out is None else out
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    status = _run(
        "paged_decode_attention_f32",
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        tables.stride(0), lens.data_ptr(), out.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged_decode_attention_f32 could not allocate its score buffer")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _run("rms_norm_f32", x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x, residual = x.contiguous(), residual.contiguous()
    out, total = torch.empty_like(x), torch.empty_like(x)
    n = x.shape[-1]
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
    """
    for t in (q, k):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"rope needs contiguous heads within a row, got strides {t.stride()}")
    positions = positions.to(torch.int64).contiguous()
    _run("rope_f32", 
        q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
        positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[2],
    )
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    _run("silu_and_mul_f32", gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Writes rows of k, v [tokens, kv_heads, d] into kv_cache [2, blocks, block_size, kv_heads,
    d] at the flat slots; slots < 0 are skipped."""
    k, v = k.contiguous(), v.contiguous()
    slots = slots.to(torch.int64).contiguous()
    row = k[0].numel() if k.shape[0] else 0
    _run("store_kv_f32", 
        k.data_ptr(), v.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        slots.data_ptr(), k.shape[0], row,
    )


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [out, in] repacked into the panel layout that `packed_linear` reads:
    [ceil(out / 16), in, 16], the padding columns zero."""
    n, k = weight.shape
    weight = weight.contiguous()
    packed = weight.new_empty(((n + PANEL - 1) // PANEL, k, PANEL))
    _run("pack_linear_weight_f32", weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight given by `pack_linear_weight`; x [..., in]
    float32."""
    k = packed.shape[1]
    rows = x.reshape(-1, k).contiguous()
    out = rows.new_empty((rows.shape[0], out_features))
    bias = bias.contiguous() if bias is not None else None  # kept alive through the call
    _run("packed_linear_f32",
        rows.data_ptr(), packed.data_ptr(), bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        rows.shape[0], out_features, k, torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], out_features)
