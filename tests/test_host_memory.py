"""The C heap is trimmed after every XLA compile, and a trim really returns freed memory to the OS."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from sftjax import host_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_trim_returns_freed_heap_blocks_to_the_os():
    """256 MiB in 64 KiB blocks (below glibc's mmap threshold, so from the arena), touched, then
    freed except the last (which pins the arena top, so glibc cannot shrink the heap on its own):
    the freed pages stay resident until `trim`."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 << 10, 4096
    blocks = [libc.malloc(size) for _ in range(n)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:
        libc.free(b)
    held = resident_bytes()
    assert host_memory.trim()
    released = held - resident_bytes()
    libc.free(blocks[-1])
    assert released > 0.75 * size * n, f"trim released {released / 2**20:.0f} MiB of {size * n / 2**20:.0f}"


def test_every_compile_and_only_a_compile_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "trim", lambda: calls.append(1) or True)
    assert host_memory.install()
    assert host_memory.install()  # idempotent: one listener, one trim per compile

    @jax.jit
    def f(x):
        return jnp.tanh(x) * 3.0 + 0.5

    x = np.arange(7, dtype=np.float32)
    jax.block_until_ready(f(x))
    assert len(calls) == 1  # the event name jax records per compile still matches COMPILE_EVENT
    jax.block_until_ready(f(x + 1))  # cached executable: no compile, no trim
    assert len(calls) == 1
    jax.block_until_ready(f(np.arange(9, dtype=np.float32)))  # a new shape compiles again
    assert len(calls) == 2
