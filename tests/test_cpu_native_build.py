"""Building and loading the CPU kernel library (novainfer/kernels/cpu_native.py).

Loading it leaves the process's floating-point mode alone (denormals survive: no
crtfastmath.o); the cache key follows the flags and the compiler's version; the kernels
folder is private and a library others could replace is refused (the fallback path takes
over); processes starting together build once; a hung compiler is stopped with a clear error.
Each build here goes to a fresh cache folder and takes a second or two.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novainfer.kernels import cpu_native

pytestmark = pytest.mark.skipif(
    cpu_native.find_compiler() is None, reason="no C compiler: the CPU kernels cannot be built"
)
REAL_CC = cpu_native.find_compiler()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty novainfer cache and no library loaded yet in this process."""
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_failure", None)
    return tmp_path / "cache" / "kernels"


def _fake_compiler(path: Path, body: str) -> str:
    """An executable shell script standing in for the C compiler."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _python(code: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


DENORMALS = """
import numpy, torch
from novainfer.kernels import cpu_native
cpu_native.FLAGS += {extra!r}
cpu_native.load_library()
print(bool((torch.tensor([1e-39]) * 1).item() != 0), bool(numpy.float32(1e-39) * 1 != 0))
"""


@pytest.mark.parametrize("extra_flags", [[], ["-ffast-math"]])
def test_loading_the_kernels_keeps_denormals(tmp_path, extra_flags):
    # In a fresh process: the library's start-up code runs when it is loaded. With
    # -ffast-math (the old flags) GCC links crtfastmath.o, whose constructor sets
    # flush-to-zero for the process: the guard that this test can fail.
    proc = _python(DENORMALS.format(extra=extra_flags), {"NOVAINFER_CACHE_DIR": str(tmp_path)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    if not extra_flags:
        assert out.split() == ["True", "True"]  # torch and numpy keep 1e-39
    elif out.split() == ["True", "True"]:
        pytest.skip("this compiler does not link crtfastmath.o into shared libraries")
    else:
        assert out.split() == ["False", "False"]


def test_new_kernels_folder_is_private(fresh):
    cpu_native.load_library()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert [p.name for p in fresh.glob("*.so")] == [f"cpu_kernels-{cpu_native.cache_key(REAL_CC)}.so"]


def test_cache_key_follows_flags_and_compiler_version(monkeypatch, tmp_path):
    key = cpu_native.cache_key(REAL_CC)
    assert cpu_native.cache_key(REAL_CC) == key
    monkeypatch.setattr(cpu_native, "FLAGS", [*cpu_native.FLAGS, "-DSOMETHING"])
    assert cpu_native.cache_key(REAL_CC) != key
    monkeypatch.undo()
    # Same compiler path, another version (an upgrade in place).
    cc = _fake_compiler(tmp_path / "cc", "echo 'cc 12.2'")
    old = cpu_native.cache_key(cc)
    _fake_compiler(tmp_path / "cc", "echo 'cc 13.1'")
    assert cpu_native.cache_key(cc) != old


@pytest.mark.parametrize("what", ["group-writable folder", "world-writable library",
                                  "folder of another user"])
def test_a_library_others_could_replace_is_refused(fresh, monkeypatch, what):
    cpu_native.load_library()  # builds into the fresh folder
    monkeypatch.setattr(cpu_native, "_library", None)
    library = next(fresh.glob("*.so"))
    if what == "group-writable folder":
        fresh.chmod(0o770)
        message = "writable by other users"
    elif what == "world-writable library":
        library.chmod(0o757)
        message = "writable by other users"
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
        message = "not to this user"
    with pytest.raises(RuntimeError, match=message):
        cpu_native.load_library()
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):  # the fallback path
        assert not cpu_native.native_available()


def test_processes_starting_together_build_once(tmp_path):
    # The compiler logs each build and takes a second, so both processes ask for it at once.
    log = tmp_path / "builds.log"
    script = (f'case "$1" in --version) exec {REAL_CC} --version;; esac\n'
              f'echo build >> {log}\nsleep 1\nexec {REAL_CC} "$@"')
    cc = _fake_compiler(tmp_path / "cc", script)
    code = ("from novainfer.kernels import cpu_native\nimport torch\n"
            "x = torch.randn(3, 8)\n"
            "assert torch.allclose(cpu_native.silu_and_mul(x), torch.nn.functional.silu(x[:, :4]) "
            "* x[:, 4:], atol=1e-6)\n")
    env = {"NOVAINFER_CACHE_DIR": str(tmp_path / "cache"), "CC": cc}
    procs = [_python(code, env) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert log.read_text().split() == ["build"]
    kernels = tmp_path / "cache" / "kernels"
    assert len(list(kernels.glob("*.so"))) == 1
    assert [p for p in kernels.iterdir() if p.is_dir()] == []  # no half-built leftovers


def test_a_hung_compiler_is_stopped_with_a_clear_error(fresh, monkeypatch, tmp_path):
    cc = _fake_compiler(tmp_path / "cc", 'case "$1" in --version) echo cc 1.0; exit;; esac\n'
                                         "sleep 60")
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(cpu_native, "BUILD_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="took more than 1 s and was stopped"):
        cpu_native.load_library()
    assert time.monotonic() - start < 30  # the sleeping child was killed, not waited for
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert not cpu_native.native_available()
